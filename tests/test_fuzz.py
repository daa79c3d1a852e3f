"""schemathesis against /openapi.json of a running gunicorn: no 5xx, and every answer is the one declared.

The service runs on its own MLflow store, with one training slot and a short time limit; every /train
the fuzzer sends is made `activate: false` (tests/fuzz_hooks.py), so the model the later cases expect
never changes. The run is made twice: with the management token and without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections import Counter

import pytest
import requests

from tests.conftest import DEFAULT_NAME, ROOT, ref
from tests.servers import BIN, Service

pytestmark = pytest.mark.drill

TOKEN = "fuzz-token-0123456789"
MAX_EXAMPLES = 20  # per operation and generation phase; both runs take about two minutes here
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",  # its own store: /train calls stay here
        "STATE_DIR": str(folder / "state"),
        "API_TOKEN": TOKEN,
        "TRAIN_MAX_CONCURRENT_JOBS": "1",
        "TRAIN_TIME_LIMIT_SECONDS": "30",
        "TRAIN_MAX_ROWS": "2000",
        "TRAIN_MAX_COLUMNS": "50",
        "MAX_BATCH_ROWS": "1000",
    }
    service = Service(env, folder, workers=2).start()
    yield service
    try:
        _wait_for_training_slot(folder / "state" / "train-slots" / "slot-0.lock", timeout=60)
    finally:
        service.stop()


def _wait_for_training_slot(slot, timeout: float) -> None:
    """Leave no training job behind: the slot's lock is free once the last job process has ended."""
    if not slot.exists():
        return
    deadline = time.monotonic() + timeout
    with open(slot, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "a fuzzed training job outlived its time limit"
                time.sleep(0.5)


def schemathesis_run(service: Service, folder, *options: str) -> tuple[subprocess.CompletedProcess, Counter]:
    """`st run` against the service's document; returns the run and the count of answers by status."""
    har = folder / "run.har"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    done = subprocess.run(
        [str(BIN / "st"), "run", f"{service.url}/openapi.json", "--checks", CHECKS, "--max-examples",
         str(MAX_EXAMPLES), "--seed", "8", "--workers", "1", "--request-timeout", "90", "--no-shrink",
         "--report", "har", "--report-har-path", str(har), *options],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    return done, Counter(entry["response"]["status"] for entry in entries)


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
def test_fuzz_finds_no_5xx_and_only_declared_answers(fuzz_service, tmp_path, with_token):
    options = ["--header", f"Authorization: Bearer {TOKEN}", "--checks", "ignored_auth"] if with_token else []
    done, statuses = schemathesis_run(fuzz_service, tmp_path, *options)
    cases = sum(statuses.values())
    print(f"\nfuzz ({'with' if with_token else 'without'} the token): {cases} requests, statuses {dict(statuses)}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert cases > 200
    assert not [status for status in statuses if status >= 500]
    if not with_token:
        assert statuses[401] > 0  # /train and /use-model refused without it
    assert "Traceback" not in fuzz_service.log_text()
    # The fuzzer's jobs did not activate anything: the service still serves what it started with.
    assert ref(requests.get(f"{fuzz_service.url}/ready", timeout=10).json()["model"]) == {
        "name": DEFAULT_NAME,
        "version": "1",
    }


def test_a_keep_alive_client_is_not_stalled_after_an_early_answer(fuzz_service):
    """A 401 or 405 is given before the body is read; the next request on that connection must not wait."""
    session = requests.Session()
    for _ in range(10):
        assert session.post(f"{fuzz_service.url}/train", json={"estimator": "GaussianNB"}, timeout=3).status_code == 401
        assert session.put(f"{fuzz_service.url}/predict", json={"a": 1}, timeout=3).status_code == 405
        started = time.monotonic()
        assert session.get(f"{fuzz_service.url}/health", timeout=3).status_code == 200
        assert time.monotonic() - started < 1
