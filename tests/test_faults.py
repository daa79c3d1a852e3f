"""Fault drills against real processes: gunicorn with 2 workers, an `mlflow server`, training jobs.

Each drill breaks one thing the service depends on, in the middle of work, and checks what a client
sees: the tracking server killed while a job trains, a worker killed in the middle of a request, the
state folder read-only or full during /use-model, and the service restarted with jobs in flight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import DEFAULT_NAME, IRIS_ROW, ref
from tests.fault_helpers import TrackingServer, connection_owner, processes_with
from tests.servers import Service, worker_pids

pytestmark = pytest.mark.drill

TOKEN = "drill-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOW_JOB = {"estimator": "GradientBoostingClassifier", "dataset": "digits", "params": {"n_estimators": 100}}


# ---- helpers ------------------------------------------------------------------------------------
def predict(url: str) -> requests.Response:
    # A new connection each time, so the kernel spreads the requests over the workers.
    return requests.post(f"{url}/predict", json=IRIS_ROW, timeout=30, headers={"Connection": "close"})


def wait_for_job(url: str, job_id: str, statuses: tuple, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        answer = requests.get(f"{url}/train/jobs/{job_id}", headers=AUTH, timeout=30)
        if answer.status_code == 200 and answer.json()["status"] in statuses:
            return answer.json()
        assert time.monotonic() < deadline, f"job {job_id} never reached {statuses}: {answer.text}"
        time.sleep(0.3)


def start_service(env: dict, folder: Path, **extra) -> Service:
    settings = {"STATE_DIR": str(folder / "state"), "API_TOKEN": TOKEN, "ACTIVE_POLL_SECONDS": "1",
                "GUNICORN_MAX_REQUESTS": "0", **env, **{k: str(v) for k, v in extra.items()}}  # fmt: skip
    return Service(settings, folder, workers=2).start()


@pytest.fixture(scope="module")
def iris_nb(store):
    """A second iris version (another estimator), registered and not active."""
    from kernel.registry import ModelRef
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    result = run_training(store["registry"], TrainingSpec("GaussianNB", activate=False), load_builtin("iris"))
    return ModelRef(**result["model"])


@pytest.fixture
def default_active(store):
    """The shared store serves its default model before and after the drill."""
    store["registry"].set_active_model(store["default"])
    yield store["default"]
    store["registry"].set_active_model(store["default"])


# ---- the drills ---------------------------------------------------------------------------------
def test_tracking_server_killed_while_a_job_trains(tmp_path):
    tracking = TrackingServer(tmp_path / "tracking").start()
    service = None
    try:
        # One attempt: the job cannot run again after the outage, so it must end failed (with attempts
        # left it would run again once the server is back; test_killed_attempt_is_retried covers that).
        service = start_service({"MLFLOW_TRACKING_URI": tracking.uri}, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0,
                                MLFLOW_HTTP_REQUEST_TIMEOUT=3, TRAIN_TIME_LIMIT_SECONDS=300,
                                TRAIN_MAX_ATTEMPTS=1)  # fmt: skip
        default = {"name": DEFAULT_NAME, "version": "1"}
        submitted = requests.post(f"{service.url}/train", json=SLOW_JOB, headers=AUTH, timeout=30)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        wait_for_job(service.url, job_id, ("running",), timeout=60)
        time.sleep(1)  # inside the fit

        tracking.kill()
        served, deadline = 0, time.monotonic() + 120
        # The job can record nothing now: its attempt gives up after a lease (30 s) without the server.
        while processes_with(job_id):
            assert time.monotonic() < deadline, "the job's processes outlived the tracking server by 2 minutes"
            answer = predict(service.url)
            assert answer.status_code == 200 and ref(answer.json()["model"]) == ref(default)
            served += 1
            time.sleep(0.2)
        outage = requests.get(f"{service.url}/train/jobs/{job_id}", headers=AUTH, timeout=30)
        assert outage.status_code == 503 and outage.json()["error"] == "registry_unavailable"
        assert ref(predict(service.url).json()["model"]) == ref(default)

        tracking.start()  # the service's sweeper starts the job again; its next attempt records the lost one
        job = wait_for_job(service.url, job_id, ("failed", "succeeded"), timeout=90)
        assert job["status"] == "failed", job
        assert "was lost" in job["error"] and "No attempts left" in job["error"], job
        models = requests.get(f"{service.url}/models", timeout=30).json()["models"]
        assert [(m["name"], m["version"], m["active"]) for m in models] == [(DEFAULT_NAME, "1", True)]
        assert ref(predict(service.url).json()["model"]) == ref(default)
        print(f"\ntracking server killed mid-job: {served} predictions served during the outage; job: {job['error']}")
    finally:
        if service is not None:
            service.stop()
        tracking.kill()


def test_worker_killed_mid_request_fails_only_that_request(store, iris_nb, default_active, tmp_path):
    service = start_service({"MLFLOW_TRACKING_URI": store["uri"]}, tmp_path)
    try:
        # The master preloaded the default model; the active version is now another one, so a new
        # worker forked from the master must catch up before its first answer.
        active = iris_nb.as_dict()
        assert requests.post(f"{service.url}/use-model", json=active, headers=AUTH, timeout=60).status_code == 200
        workers = service.wait_for_workers()
        assert "Worker (pid:" not in service.log_text(), f"a worker died before the drill:\n{service.log_tail()}"

        # A big batch, half sent: a worker thread is inside /predict, reading the body.
        body = json.dumps({"records": [IRIS_ROW] * 5000}).encode()
        victim_connection = socket.create_connection(("127.0.0.1", service.port), timeout=30)
        victim_connection.sendall(
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.5)
        victim = connection_owner(service.port, victim_connection.getsockname()[1], workers)
        os.kill(victim, signal.SIGKILL)

        with pytest.raises(OSError):  # that request fails: the connection is reset or closed unanswered
            victim_connection.sendall(body[len(body) // 2 :])
            if not victim_connection.recv(65536):
                raise ConnectionResetError("closed without an answer")
        victim_connection.close()

        answered, replacement = [], None
        deadline = time.monotonic() + 60
        while replacement is None or len(answered) < 40:
            assert time.monotonic() < deadline, "no replacement worker answered within 60 s"
            answer = predict(service.url)  # every other request succeeds, during and after the respawn
            assert answer.status_code == 200, answer.text
            assert ref(answer.json()["model"]) == ref(active), (
                f"worker {answer.headers['X-Worker-Pid']} served the old model"
            )
            pid = int(answer.headers["X-Worker-Pid"])
            answered.append(pid)
            if pid not in workers:
                replacement = pid
        assert victim not in answered
        assert worker_pids(service.process.pid) == (workers - {victim}) | {replacement}
        print(f"\nworker {victim} killed mid-request; replacement {replacement} served {active}; {len(answered)} ok")
    finally:
        service.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        message = f"this drill mounts a small tmpfs as the state folder, which needs root: {mounted.stderr!r}"
        if os.environ.get("REQUIRE_TMPFS") == "1":
            pytest.fail(f"{message} (REQUIRE_TMPFS=1: it must run here)")
        pytest.skip(f"{message} (set REQUIRE_TMPFS=1 to make this a failure)")


def _fill(path: Path) -> None:
    with open(path / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()
        except OSError:
            pass


def _serves_everywhere(service: Service, expected: dict) -> None:
    """Both workers answer with `expected` (the kernel spreads new connections unevenly: ask until each has answered)."""
    workers, pids, asked = worker_pids(service.process.pid), set(), 0
    deadline = time.monotonic() + 60
    while len(pids) < 2 or asked < 30:
        assert time.monotonic() < deadline, f"only workers {pids} of {workers} answered:\n{service.log_tail()}"
        answer, asked = predict(service.url), asked + 1
        assert answer.status_code == 200 and ref(answer.json()["model"]) == ref(expected)
        pids.add(answer.headers["X-Worker-Pid"])
    assert worker_pids(service.process.pid) == workers, "a worker was replaced during the drill"


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_state_folder_read_only_or_full_during_use_model(store, iris_nb, wine_tree, default_active, tmp_path, fault):
    state = tmp_path / "state"
    _mount_tmpfs(state, "64m")
    service = None
    try:
        service = start_service({"MLFLOW_TRACKING_URI": store["uri"]}, tmp_path)
        default, nb = default_active.as_dict(), iris_nb.as_dict()
        # The other iris version goes through this machine's cache once, so the swap below needs no
        # download: it is the pointer (and for read-only, the lock) that cannot be written.
        for version in (nb, default):
            assert requests.post(f"{service.url}/use-model", json=version, headers=AUTH, timeout=60).status_code == 200

        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
            reason = "Read-only file system"
        else:
            _fill(state)
            reason = "No space left on device"
        for target in (nb, wine_tree.as_dict()):  # cached, and never downloaded here
            answer = requests.post(f"{service.url}/use-model", json=target, headers=AUTH, timeout=60)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "state_not_writable"
            assert reason in answer.json()["message"]
            assert answer.headers["Retry-After"]
            assert store["registry"].get_active_model() == default_active  # not left naming the new version
            _serves_everywhere(service, default)  # the old model, on this worker and the other

        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        else:
            (state / "filler").unlink()
        assert requests.post(f"{service.url}/use-model", json=nb, headers=AUTH, timeout=60).status_code == 200
        _serves_everywhere(service, nb)
        assert "Traceback" not in service.log_text()
    finally:
        if service is not None:
            service.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_restart_with_a_job_running_and_one_queued_loses_neither(store, default_active, tmp_path):
    service = start_service({"MLFLOW_TRACKING_URI": store["uri"]}, tmp_path, TRAIN_MAX_CONCURRENT_JOBS=2)
    try:
        running = requests.post(f"{service.url}/train", json={**SLOW_JOB, "activate": False}, headers=AUTH, timeout=30)
        assert running.status_code == 202, running.text
        wait_for_job(service.url, running.json()["job_id"], ("running",), timeout=60)
        queued = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "wine",
                                                             "activate": False}, headers=AUTH, timeout=30)  # fmt: skip
        assert queued.status_code == 202 and queued.json()["status"] == "queued", queued.text

        service.stop()  # gunicorn's graceful stop, then a new start on the same port and state
        service.start()

        registered = {
            (m["name"], m["version"]) for m in requests.get(f"{service.url}/models", timeout=30).json()["models"]
        }
        for submitted in (running, queued):
            job = wait_for_job(service.url, submitted.json()["job_id"], ("succeeded", "failed"), timeout=240)
            assert job["status"] == "succeeded", job
            model = job["result"]["model"]
            registered = {
                (m["name"], m["version"]) for m in requests.get(f"{service.url}/models", timeout=30).json()["models"]
            }
            assert (model["name"], model["version"]) in registered
        assert ref(predict(service.url).json()["model"]) == ref(default_active.as_dict())  # activate: false held
    finally:
        service.stop()


def test_restart_that_kills_a_running_job_reports_it_failed(store, default_active, tmp_path):
    """A machine restart takes the jobs' processes too: the running job must read failed, not running
    forever, and the queued one must still run. Nobody cleans up: the restarted service's sweeper finds
    the jobs whose lock no process holds, and starts them again."""
    service = start_service({"MLFLOW_TRACKING_URI": store["uri"]}, tmp_path, TRAIN_MAX_ATTEMPTS=1)
    try:
        # Killed, so never trained to the end: long enough (300 rounds of depth-8 trees for 10 classes) that it
        # cannot finish before the kill. SLOW_JOB once had, on a quiet machine, and the restart read it succeeded.
        long_job = {**SLOW_JOB, "params": {"n_estimators": 300, "max_depth": 8}, "activate": False}
        submitted = requests.post(f"{service.url}/train", json=long_job, headers=AUTH, timeout=30)
        job_id = submitted.json()["job_id"]
        wait_for_job(service.url, job_id, ("running",), timeout=60)
        quick = {
            "estimator": "DecisionTreeClassifier",
            "dataset": "iris",
            "activate": False,
            "model_name": "after-restart",
        }
        queued_id = requests.post(f"{service.url}/train", json=quick, headers=AUTH, timeout=30).json()["job_id"]
        assert wait_for_job(service.url, queued_id, ("queued",), timeout=5)["status"] == "queued"
        time.sleep(2)  # the queued job's process is up, waiting for the one slot
        everything = {service.process.pid} | worker_pids(service.process.pid)
        everything |= set(processes_with(job_id)) | set(processes_with(queued_id))
        for pid in everything:  # as a power cut or a container stop would: no process gets to clean up
            os.kill(pid, signal.SIGKILL)
        service.process.wait()
        status = store["registry"].client.get_run(job_id).data.tags["job.status"]
        assert status == "running", f"the drill came too late: the job was {status} when its processes were killed"
        service.process = None
        service.stop()
        service.start()
        job = wait_for_job(service.url, job_id, ("succeeded", "failed"), timeout=120)
        assert job["status"] == "failed" and "process" in job["error"], job
        versions = store["registry"].client.search_model_versions(f"run_id = '{job_id}'")
        assert list(versions) == []
        queued = wait_for_job(service.url, queued_id, ("succeeded", "failed"), timeout=120)
        assert queued["status"] == "succeeded" and queued["attempt"] == 1, queued
        assert len(store["registry"].client.search_model_versions(f"run_id = '{queued_id}'")) == 1
    finally:
        service.stop()
