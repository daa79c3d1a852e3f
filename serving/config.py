"""Configuration: defaults that work on a fresh machine, overridden by the environment, then by tests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = PROJECT_ROOT / ".mlflow"

ROLES = ("all", "inference", "training")

# name: (default, parser). Every key may be set in the environment under the same name.
_SETTINGS: dict[str, tuple[object, type]] = {
    "APP_ROLE": ("all", str),
    "MLFLOW_TRACKING_URI": (f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}", str),
    "MLFLOW_EXPERIMENT_NAME": ("model-serving", str),
    "DEFAULT_MODEL_NAME": ("iris-RandomForestClassifier", str),
    "ACTIVE_ALIAS": ("active", str),
    "STATE_DIR": ("", str),
    "ACTIVE_POLL_SECONDS": (5.0, float),
    "MODEL_WAIT_SECONDS": (30.0, float),
    "MAX_CONTENT_LENGTH": (6 * 1024 * 1024, int),
    "MAX_BATCH_ROWS": (50_000, int),
    "API_TOKEN": ("", str),
    "BOOTSTRAP_DEFAULT_MODEL": (True, bool),
    # gunicorn.conf.py turns this off in the master when it preloads the app; each worker starts its own.
    "WATCH_REGISTRY": (True, bool),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": (5, int),
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": (2, int),
    "TRAIN_MAX_CONCURRENT_JOBS": (2, int),
    "TRAIN_TIME_LIMIT_SECONDS": (600, int),
    "TRAIN_MAX_ROWS": (50_000, int),
    "TRAIN_MAX_COLUMNS": (200, int),
    "LOG_FORMAT": ("json", str),  # json (one object a line) or text (for a terminal)
    "LOG_LEVEL": ("info", str),
}


def _parse(value: str, kind: type) -> object:
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return kind(value)


def load_config(overrides: dict | None = None) -> dict:
    """Return the settings: defaults, then the environment, then `overrides` (a test's config)."""
    config = {name: default for name, (default, _) in _SETTINGS.items()}
    for name, (_, kind) in _SETTINGS.items():
        if os.environ.get(name):
            config[name] = _parse(os.environ[name], kind)
    config.update(overrides or {})
    if config["APP_ROLE"] not in ROLES:
        raise ValueError(f"APP_ROLE must be one of {ROLES}, not {config['APP_ROLE']!r}")
    if not config["STATE_DIR"]:
        config["STATE_DIR"] = str(default_state_dir(config["MLFLOW_TRACKING_URI"]))
    return config


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI, or None for any other URI."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :])


def artifact_location(tracking_uri: str) -> str | None:
    """Where artifacts go for a local SQLite store: a folder beside the database file."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").as_uri() if db else None


def default_state_dir(tracking_uri: str) -> Path:
    """This machine's cache of downloaded models and its active-model pointer, one per store.

    Beside the database for a local store; under the temp folder (Lambda's /tmp) otherwise.
    """
    db = sqlite_path(tracking_uri)
    if db:
        return db.parent / "serving-state"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"model-serving-{digest}"


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail fast on a tracking URI MLflow cannot use, before any request is served."""
    scheme = urlparse(tracking_uri).scheme
    if scheme not in ("sqlite", "http", "https", "postgresql", "mysql", "file", "databricks", ""):
        raise ValueError(f"MLFLOW_TRACKING_URI has an unsupported scheme: {tracking_uri!r}")
