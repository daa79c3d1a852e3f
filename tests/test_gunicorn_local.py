"""gunicorn on the embedded store (as `make run`): both preload settings, and workers recycled after a swap."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.conftest import AUTH, DEFAULT_NAME, IRIS_ROW, ref
from tests.servers import Service


def predict(url: str) -> requests.Response:
    return requests.post(f"{url}/predict", json=IRIS_ROW, timeout=30, headers={"Connection": "close"})


@pytest.mark.parametrize("preload", ["false", "true"])
def test_empty_store_bootstraps_once_and_swaps_reach_every_worker(tmp_path, preload):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GUNICORN_PRELOAD": preload}
    service = Service(env, tmp_path, workers=4).start()
    try:
        models = requests.get(f"{service.url}/models", timeout=30).json()["models"]
        assert [(m["name"], m["version"]) for m in models] == [(DEFAULT_NAME, "1")]
        trained = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "iris",
                                                               "model_name": "iris-nb", "wait": True}, timeout=300, headers=AUTH)  # fmt: skip
        assert trained.status_code == 201, trained.text
        pids, sent, deadline = set(), 0, time.monotonic() + 20
        # Right after the 201, whichever worker answers serves the new version. A new connection goes to a
        # worker holding the fewest (service/gunicorn_worker.py): one that still holds an idle keep-alive
        # connection (requests leaves the /train one open; gunicorn closes it after its keepalive, 5 s) takes
        # none meanwhile, so keep asking, bounded in requests and time, until every one of the 4 has answered.
        while (len(pids) < 4 or sent < 40) and sent < 20_000 and time.monotonic() < deadline:
            answer = predict(service.url)
            sent += 1
            assert ref(answer.json()["model"]) == {"name": "iris-nb", "version": "1"}
            pids.add(answer.headers["X-Worker-Pid"])
        assert len(pids) == 4, f"{sent} requests reached only {len(pids)} workers"
    finally:
        service.stop()


def test_recycled_workers_serve_the_current_version(tmp_path):
    """With preload, a recycled worker forks from the master's (older) model and must catch up first."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GUNICORN_MAX_REQUESTS": "10",
           "GUNICORN_MAX_REQUESTS_JITTER": "0", "ACTIVE_POLL_SECONDS": "60"}  # fmt: skip
    service = Service(env, tmp_path, workers=2).start()
    try:
        trained = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "iris",
                                                               "model_name": "iris-nb", "wait": True}, timeout=300, headers=AUTH)  # fmt: skip
        assert trained.status_code == 201, trained.text
        pids = set()
        for _ in range(80):  # every worker is replaced several times over
            answer = predict(service.url)
            assert answer.status_code == 200
            assert ref(answer.json()["model"]) == {"name": "iris-nb", "version": "1"}
            pids.add(answer.headers["X-Worker-Pid"])
        assert len(pids) > 4, "workers were not recycled"
    finally:
        service.stop()


def test_a_stop_does_not_wait_for_idle_keep_alive_connections(tmp_path):
    """An idle keep-alive connection (a client or a load balancer that keeps it after an answer) held
    gunicorn 26's graceful stop for the whole graceful_timeout (30 s), and a restart on the same port
    then failed: the stop closes such connections at once, and one in flight still gets its answer."""
    import http.client
    import threading

    service = Service({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, tmp_path, workers=2).start()
    idle = []
    for _ in range(4):  # several, so that both workers hold one
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        connection.request("GET", "/health")
        assert connection.getresponse().read()
        idle.append(connection)
    busy = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    batch = json.dumps({"records": [IRIS_ROW] * 20_000})
    answers = []
    sender = threading.Thread(target=lambda: answers.append(_post(busy, batch)))
    sender.start()
    time.sleep(0.05)
    started = time.monotonic()
    service.process.terminate()
    service.process.wait(timeout=60)
    took = time.monotonic() - started
    sender.join(timeout=60)
    for connection in [*idle, busy]:
        connection.close()
    service.stop()
    assert took < 10, f"the graceful stop took {took:.1f} s"
    assert answers and answers[0] in (200, None), answers  # None: sent after the stop began, refused
    service.start()  # the same port is free again
    service.stop()


def _post(connection, body: str):
    try:
        connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    except (ConnectionError, OSError):
        return None
