"""Real servers for the tests, on free loopback ports: gunicorn running the service, moto's S3,
PostgreSQL databases and an `mlflow server` on them. Each is started by a fixture and stopped after."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, TOKEN, free_port, stop, wait_for_http

BIN = Path(sys.executable).parent


class LoggedProcess:
    """A server subprocess with its log file: stop() ends the process and closes the log, and may be called twice."""

    process: subprocess.Popen | None = None
    log = None

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
        if self.log is not None:
            self.log.close()
            self.log = None


class Service(LoggedProcess):
    """The service under gunicorn (gunicorn.conf.py, as `make serve` runs it), with the tests' API token."""

    def __init__(self, env: dict, folder: Path, workers: int = 4):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "API_TOKEN": TOKEN,
            # Jobs start cold unless a test asks for the warm parent: it costs a process and its imports at each
            # start, and most services here train one job or none.
            "TRAIN_WARM_START": "false",
            **env,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
        }
        self.folder = folder

    def spawn(self) -> Service:
        """Start gunicorn and return at once, without waiting for it to answer (start() waits)."""
        self.log = open(self.folder / f"gunicorn-{self.port}.log", "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self

    def start(self, timeout: float = 120) -> Service:
        self.spawn()
        try:
            wait_for_http(f"{self.url}/health", timeout=timeout, process=self.process)
            deadline = time.monotonic() + timeout
            while requests.get(f"{self.url}/ready", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "the service never became ready"
                time.sleep(0.2)
            self.wait_for_workers(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_workers(self, timeout: float = 60) -> set[int]:
        """Wait until each of gunicorn's workers has answered a request; returns their pids.

        /ready answers from the first worker that is up; a drill that kills or counts workers needs all
        of them. A failure says how many answered and ends with the service's log (a worker that died shows there).
        """
        expected, answered = int(self.env["WEB_CONCURRENCY"]), set()
        deadline = time.monotonic() + timeout
        while True:
            workers = worker_pids(self.process.pid)
            answered &= workers  # a worker that has died since it answered no longer counts
            if len(workers) == expected and answered == workers:
                return workers
            assert time.monotonic() < deadline, (
                f"{len(answered)} of {expected} workers answered within {timeout:.0f} s (running: {sorted(workers)});"
                f" the log ends:\n{self.log_tail()}"
            )
            # A new connection each time: the kernel hands it to whichever worker accepts first.
            answer = requests.get(f"{self.url}/health", headers={"Connection": "close"}, timeout=10)
            answered.add(int(answer.headers["X-Worker-Pid"]))
            if len(answered) < len(workers):
                time.sleep(0.02)

    def log_text(self) -> str:
        return (self.folder / f"gunicorn-{self.port}.log").read_text()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def worker_pids(master: int) -> set[int]:
    """gunicorn's workers: the children of its master process."""
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                children.add(int(entry))
    return children


def postgres_available() -> bool:
    """Whether a PostgreSQL server answers at 127.0.0.1:5432. Only "could not connect" (psycopg2's
    OperationalError) means no; anything else (psycopg2 missing, a bug here) is an error, not a skip."""
    import psycopg2

    try:
        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


def require_postgres() -> None:
    """Skip where PostgreSQL is not running (a laptop); CI sets REQUIRE_POSTGRES=1, which makes that a failure."""
    if not postgres_available():
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required here (REQUIRE_POSTGRES=1) but not reachable")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (set REQUIRE_POSTGRES=1 to make this a failure)")


def create_database() -> str:
    """A fresh, empty database for one test run; returns its SQLAlchemy URI."""
    import psycopg2

    name = f"mlflow_test_{uuid.uuid4().hex[:12]}"
    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return name


def drop_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


class S3Server(LoggedProcess):
    """moto's standalone server: an S3-compatible endpoint on loopback, as a team's S3 bucket."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = folder

    def start(self) -> S3Server:
        self.log = open(self.folder / "moto.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(self.url, process=self.process)
        except Exception:
            self.stop()
            raise
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=name)  # fmt: skip


def start_mlflow_server(backend_uri: str, artifacts: str, folder: Path, env: dict | None = None, port: int = 0):
    """An `mlflow server` (proxied artifacts) on a loopback port; returns (process, uri, log)."""
    port = port or free_port()
    log = open(folder / f"mlflow-{port}.log", "a")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90, process=process)
    except Exception:
        stop(process)
        log.close()
        raise
    return process, f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def mlflow_server_with(folder: Path, trainings: list[list[str]], env: dict | None = None):
    """An `mlflow server` on a fresh SQLite store with versions registered by the batch job: each entry of
    `trainings` is the arguments of one `python -m training` run. Yields the tracking URI."""
    process, uri, log = start_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri(),
                                            folder, env=env)  # fmt: skip
    try:
        for arguments in trainings:
            subprocess.run([sys.executable, "-m", "training", *arguments], cwd=ROOT, check=True, capture_output=True,
                           env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=300)  # fmt: skip
        yield uri
    finally:
        stop(process)
        log.close()


COMPILED = "iris-RandomForestClassifier"  # a version with a verified ONNX form
NOT_COMPILED = "iris-HistGradientBoostingClassifier"  # one without (skl2onnx cannot convert it)


@contextlib.contextmanager
def compiled_and_not_compiled(folder: Path):
    """An `mlflow server` (registry only) holding COMPILED, active, and NOT_COMPILED, both from the batch job, and
    a second compiled version of COMPILED (LogisticRegression, not active: a rollout's candidate).

    Without MLflow's job runner the server starts in a third of the processes. Yields the tracking URI.
    """
    trainings = [
        ["--estimator", "RandomForestClassifier", "--dataset", "iris", "--model-name", COMPILED],
        ["--estimator", "HistGradientBoostingClassifier", "--dataset", "iris", "--model-name", NOT_COMPILED,
         "--no-activate"],
        ["--estimator", "LogisticRegression", "--dataset", "iris", "--model-name", COMPILED, "--no-activate"],
    ]  # fmt: skip
    with mlflow_server_with(folder, trainings, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as uri:
        yield uri
