"""The processes of the Celery drills (test_celery.py, test_image.py, scripts/measure_train_queue.py): a throwaway
`redis-server`, and `make worker`'s command as one machine; and what the drills read of a job."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, mlflow_client
from tests.servers import LoggedProcess

TOKEN = "celery-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def require_redis() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required here (REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (set REQUIRE_REDIS=1 to make this a failure)")
    return path


class RedisServer(LoggedProcess):
    """A throwaway `redis-server` on loopback, no persistence; stop() and start() again on the same port."""

    def __init__(self, binary: str, folder):
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.log = open(self.folder / "redis.log", "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)


class Worker:
    """`make worker`'s command, as one machine: its own state folder, its own process group."""

    def __init__(self, name: str, env: dict, folder):
        self.name, self.folder = name, folder
        self.env = {**os.environ, **env, "STATE_DIR": str(folder / f"state-{name}")}
        self.process = self.log = None

    def start(self) -> Worker:
        self.log_path = self.folder / f"worker-{self.name}-{time.time():.0f}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "training.celery_worker", "-n", f"{self.name}@%h"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while " ready." not in self.log_path.read_text():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the worker never became ready"
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        """kill -9 on the worker and its job processes: the machine is gone."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.log is not None and not self.log.closed:
            self.log.close()


def versions_of(servers: dict, job_id: str) -> list:
    return mlflow_client(servers["uri"]).search_model_versions(f"run_id = '{job_id}'")


def late_redelivery_writes_nothing(servers: dict, job_id: str, logs) -> float:
    """After the job succeeded on the keeper's message, the broker hands out the killed attempt's own message once
    its visibility timeout (85 s) has passed: a worker takes it, finds the job finished (the attempt-id fence), and
    writes nothing. Waits for that delivery in the workers' logs (`logs()`: their paths); returns when it was seen."""
    tracking = mlflow_client(servers["uri"])
    before = tracking.get_run(job_id)
    versions = [(v.name, v.version) for v in versions_of(servers, job_id)]
    done = f"run_job[{job_id}] succeeded in"
    deadline = time.monotonic() + 85 + 60
    while not any(done in line and "'skipped'" in line for path in logs() for line in path.read_text().splitlines()):
        assert time.monotonic() < deadline, "the killed attempt's message never came back"
        time.sleep(1)
    seen = time.time()
    after = tracking.get_run(job_id)
    assert after.data.tags == before.data.tags and after.data.metrics == before.data.metrics
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert [(v.name, v.version) for v in versions_of(servers, job_id)] == versions
    return seen


def start_fitting(client, body: dict) -> tuple:
    """POST the job through the in-process app; its answer and its record once it is fitting."""
    answer = client.post("/train", json=body, headers=AUTH)
    while (job := client.get(answer.json["location"], headers=AUTH).json).get("phase") != "fitting":
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.1)
    return answer, job


def client_wait(client, answer, timeout: float = 240) -> dict:
    assert answer.status_code == 202, answer.json
    deadline = time.monotonic() + timeout
    while (job := client.get(answer.json["location"], headers=AUTH).json)["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job
