"""Safe by default under gunicorn as `make run` starts it: the token made once for all workers, 413 for a chunked
body over the limit, and the Host check, against the real server (no preload: every worker starts on its own)."""

from __future__ import annotations

import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import IRIS_ROW
from tests.servers import Service

LIMIT = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def service(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("safe-gunicorn")
    env = {"MLFLOW_TRACKING_URI": store["uri"], "STATE_DIR": str(folder / "state"), "GUNICORN_PRELOAD": "false",
           "API_TOKEN": "", "API_AUTH": "", "PREDICT_TOKEN": "", "ALLOWED_HOSTS": ""}  # fmt: skip
    service = Service(env, folder, workers=3).start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def token(service) -> str:
    path = Path(service.env["STATE_DIR"]) / "api-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text().strip()


def pieces(total: int, size: int = 64 * 1024):
    """A body sent with Transfer-Encoding: chunked (requests does so for a generator)."""
    sent = 0
    yield b'{"records": ['
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size
    yield b"]}"


def test_every_worker_uses_the_one_token_logged_once(service, token):
    assert len(re.findall(re.escape(token), service.log_text())) == 1
    assert f"kept in {service.env['STATE_DIR']}/api-token" in service.log_text()
    job = f"{service.url}/train/jobs/{'0' * 32}"

    def ask(_) -> tuple[str, int, int]:  # a new connection each time: the kernel spreads them over the workers
        refused = requests.get(job, headers={"Connection": "close"}, timeout=30)
        allowed = requests.get(job, headers={"Authorization": f"Bearer {token}", "Connection": "close"}, timeout=30)
        return allowed.headers["X-Worker-Pid"], refused.status_code, allowed.status_code

    workers, deadline = set(), time.monotonic() + 180  # without preload, each worker loads on its own
    with ThreadPoolExecutor(6) as pool:
        while len(workers) < 3 and time.monotonic() < deadline:
            answers = list(pool.map(ask, range(12)))
            assert {(refused, allowed) for _, refused, allowed in answers} == {(401, 404)}
            workers |= {pid for pid, _, _ in answers}
    assert len(workers) == 3, f"only {len(workers)} of the 3 workers answered"


@pytest.mark.parametrize("path", ["/predict", "/train"])
def test_chunked_body_over_the_limit_is_413(service, token, path):
    response = requests.post(f"{service.url}{path}", data=pieces(LIMIT + 1), timeout=60,
                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})  # fmt: skip
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "request_entity_too_large"


def test_body_over_the_limit_with_content_length_is_413(service):
    body = b'{"records": [' + b" " * LIMIT + b"]}"
    response = requests.post(f"{service.url}/predict", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})  # fmt: skip
    assert "Content-Length" in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "request_entity_too_large"


def test_chunked_body_within_the_limit_is_served(service):
    def rows():
        yield b'{"records": ['
        yield b",".join([requests.compat.json.dumps(IRIS_ROW).encode()] * 1000)
        yield b" " * (LIMIT - 200_000)
        yield b"]}"

    response = requests.post(f"{service.url}/predict", data=rows(), headers={"Content-Type": "application/json"},
                             timeout=60)  # fmt: skip
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 1000


@pytest.mark.parametrize(("host", "answered"), [("localhost", True), ("127.0.0.1:1", True), ("evil.example", False)])
def test_host_check_on_a_loopback_bind(service, host, answered):
    response = requests.get(f"{service.url}/health", headers={"Host": host}, timeout=30)
    assert (response.status_code == 200) is answered
    if not answered:
        assert response.status_code == 400 and response.json()["error"] == "host_not_allowed"
