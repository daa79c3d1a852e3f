"""The processes of the Celery drills (test_celery.py, test_image.py, scripts/measure_train_queue.py): a throwaway
`redis-server`, and `make worker`'s command as one machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port
from tests.servers import LoggedProcess


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
