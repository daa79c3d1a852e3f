"""Configuration checked at start: typed, range-checked settings; a bad one stops the process with one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kernel.config import ConfigError, Settings, load_settings
from kernel.settings_doc import settings_table
from service import create_app
from tests.conftest import ROOT
from tests.servers import BIN

BAD = [
    ("BOOTSTRAP_DEFAULT_MODEL", "ture", "not a boolean"),
    ("WATCH_REGISTRY", "2", "not a boolean"),
    ("GUNICORN_PRELOAD", "enabled", "not a boolean"),
    ("API_AUTH", "of", "not a boolean"),
    ("APP_ROLE", "everything", "'all', 'inference' or 'training'"),
    ("MAX_BATCH_ROWS", "-1", "greater than or equal to 1"),
    ("MAX_CONTENT_LENGTH", "0", "greater than or equal to 1"),
    ("TRAIN_MAX_ROWS", "-50", "greater than or equal to 1"),
    ("TRAIN_MAX_COLUMNS", "many", "valid integer"),
    ("TRAIN_TIME_LIMIT_SECONDS", "1.5", "valid integer"),
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1", "greater than or equal to 0"),
    ("ACTIVE_POLL_SECONDS", "0", "greater than 0"),
    ("ACTIVE_POLL_SECONDS", "nan", "finite number"),
    ("ACTIVE_POLL_SECONDS", "inf", "finite number"),
    ("PORT", "70000", "less than or equal to 65535"),
    ("PORT", "0", "greater than or equal to 1"),
    ("WEB_CONCURRENCY", "0", "greater than or equal to 1"),
    ("LOG_LEVEL", "loud", "'debug', 'info', 'warning', 'error' or 'critical'"),
    ("MLFLOW_TRACKING_URI", "ftp://example/mlflow", "unsupported scheme 'ftp'"),
    ("API_TOKEN", " padded ", "cannot be blank"),
]


@pytest.fixture
def clean_env(monkeypatch):
    """No setting from the shell that runs the tests (make exports HOST and PORT)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("name", "value", "reason"), BAD)
def test_bad_setting_is_one_clear_line(clean_env, name, value, reason):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"Invalid configuration: {name}")
    assert reason in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True),
     ("false", False), ("0", False), ("no", False), ("OFF", False), (" false ", False)],
)  # fmt: skip
def test_booleans(clean_env, value, expected):
    clean_env.setenv("BOOTSTRAP_DEFAULT_MODEL", value)
    assert load_settings().BOOTSTRAP_DEFAULT_MODEL is expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("MAX_BATCH_ROWS", "10", 10), ("ACTIVE_POLL_SECONDS", "0.5", 0.5), ("APP_ROLE", "inference", "inference"),
     ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0", 0), ("LOG_LEVEL", "DEBUG", "debug"), ("PORT", "65535", 65535),
     ("ALLOWED_HOSTS", "api.example, localhost", ("api.example", "localhost")),
     ("BOOTSTRAP_DEFAULT_MODEL", "", True)],  # an empty variable is an unset one
)  # fmt: skip
def test_good_settings_are_typed(clean_env, name, value, expected):
    clean_env.setenv(name, value)
    assert getattr(load_settings(), name) == expected


def test_defaults_and_overrides(clean_env, tmp_path):
    defaults = load_settings()
    assert defaults.APP_ROLE == "all" and defaults.API_AUTH is True and defaults.API_TOKEN is None
    assert defaults.STATE_DIR == str(ROOT / ".mlflow" / "serving-state")
    clean_env.setenv("MAX_BATCH_ROWS", "10")
    overridden = load_settings({"MAX_BATCH_ROWS": 20, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/db"})
    assert overridden.MAX_BATCH_ROWS == 20  # a test's override beats the environment
    assert overridden.STATE_DIR == str(tmp_path / "serving-state")
    assert load_settings({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).STATE_DIR.startswith(
        os.environ.get("TMPDIR", "/tmp")
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [({"MAX_BATCH_ROWS": -1}, "MAX_BATCH_ROWS=-1"), ({"MODEL_WAIT_SECONDS": 30}, "MODEL_WAIT_SECONDS: not a setting"),
     ({"WATCH_REGISTY": False}, "WATCH_REGISTY: not a setting"), ({"APP_ROLE": "train"}, "APP_ROLE='train'")],
)  # fmt: skip
def test_create_app_checks_a_tests_overrides_too(clean_env, overrides, reason):
    with pytest.raises(ConfigError, match=re.escape(reason)):
        create_app(overrides)


def test_secrets_are_never_echoed(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "ftp://user:hunter2@example/mlflow")
    clean_env.setenv("PREDICT_TOKEN", " hunter3")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert "hunter2" not in str(error.value) and "hunter3" not in str(error.value)
    assert "MLFLOW_TRACKING_URI" in str(error.value) and "PREDICT_TOKEN" in str(error.value)
    clean_env.delenv("MLFLOW_TRACKING_URI")
    clean_env.setenv("PREDICT_TOKEN", "hunter3")
    assert "hunter3" not in repr(load_settings()) and "hunter3" not in str(load_settings().model_dump())


def test_every_setting_is_documented_and_the_readme_table_is_generated():
    for name, field in Settings.model_fields.items():
        assert field.description, name
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "README's table differs: paste kernel.settings_doc.settings_table()"


def _start(command: list[str], **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    return subprocess.run(command, cwd=ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [bad for bad in BAD if bad[0] in ("BOOTSTRAP_DEFAULT_MODEL", "APP_ROLE", "MAX_BATCH_ROWS", "PORT")],
)
def test_gunicorn_stops_before_forking_with_one_line(name, value, reason):
    done = _start([str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"], **{name: value})
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # no traceback, and gunicorn never started (it logs "Starting gunicorn")
    assert lines[0].startswith(f"Invalid configuration: {name}") and reason in lines[0]


def test_training_cli_stops_with_one_line():
    done = _start([sys.executable, "-m", "training", "--estimator", "SVC", "--dataset", "iris"], TRAIN_MAX_ROWS="-1")
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "Invalid configuration: TRAIN_MAX_ROWS='-1': Input should be greater than or equal to 1"
    )
