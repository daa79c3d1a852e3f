"""Training on Celery workers (TRAIN_EXECUTOR=celery): real Redis, two workers, two API instances under gunicorn,
an `mlflow server` on PostgreSQL with S3 (moto) artifacts, and Celery's SQS transport against moto's SQS.

Redis runs as this module's own `redis-server` on a free port, so a test can stop and start it. Where
`redis-server` is missing the tests skip; CI sets REQUIRE_REDIS=1, which makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
import requests

from kernel.config import Settings
from kernel.drift_format import BASELINE_TAG
from tests.conftest import ROOT, free_port, mlflow_client, ref
from tests.servers import LoggedProcess, Service
from tests.test_production import S3_ENV, service_env, stack  # noqa: F401 - `stack` is a fixture used here

pytestmark = pytest.mark.drill

TOKEN = "celery-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIME_LIMIT = 45  # hard limit 55 s; the broker hands a vanished worker's job to another after 60 s
TRANSPORT = {"visibility_timeout": 60, "unacked_restore_interval": 2, "unacked_restore_throttle": 1}


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


def celery_env(servers: dict, broker: str, transport: dict = TRANSPORT) -> dict:
    return {"MLFLOW_TRACKING_URI": servers["uri"], "TRAIN_EXECUTOR": "celery", "CELERY_BROKER_URL": broker,
            "CELERY_BROKER_TRANSPORT_OPTIONS": json.dumps(transport), "TRAIN_TIME_LIMIT_SECONDS": str(TIME_LIMIT),
            "TRAIN_WORKER_CONCURRENCY": "1", "TRAIN_MAX_ATTEMPTS": "2", "API_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory):  # noqa: F811 - the imported fixture
    """Redis, two workers (two machines) and two API instances in celery mode."""
    binary = require_redis()
    folder = tmp_path_factory.mktemp("celery")
    redis = RedisServer(binary, folder).start()
    env = celery_env(stack, redis.url)
    workers, apis = [], []
    try:
        apis = [
            Service(service_env(stack, folder / f"api-{i}", **env), folder, workers=2).start(timeout=300)
            for i in range(2)
        ]
        workers = [Worker(f"w{i}", env, folder).start() for i in range(2)]
        yield {"redis": redis, "workers": workers, "apis": apis, "env": env, "folder": folder, "stack": stack}
    finally:
        for worker in workers:
            worker.stop()
        for api in apis:
            api.stop()
        redis.stop()


def submit(api: Service, body: dict) -> requests.Response:
    return requests.post(f"{api.url}/train", json=body, headers=AUTH, timeout=60)


def read_job(api: Service, job_id: str) -> dict:
    response = requests.get(f"{api.url}/train/jobs/{job_id}", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_done(api: Service, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = read_job(api, job_id)
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout} s: {job}"
        time.sleep(0.5)


def versions_of(servers: dict, job_id: str) -> list:
    return mlflow_client(servers["uri"]).search_model_versions(f"run_id = '{job_id}'")


def most_at_once(jobs: list[dict]) -> int:
    """The largest number of jobs whose [started, finished] intervals overlap."""
    moments = sorted(
        [(datetime.fromisoformat(job["started_at"]), 1) for job in jobs]
        + [(datetime.fromisoformat(job["finished_at"]), -1) for job in jobs]
    )  # at equal times the end (-1) sorts first
    running = peak = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    return peak


def small_job(index: int) -> dict:
    estimator = ["LogisticRegression", "DecisionTreeClassifier"][index % 2]
    return {"estimator": estimator, "dataset": "iris", "model_name": f"burst-{index}", "activate": False}


def test_a_burst_of_six_jobs_queues_and_runs_two_at_once(cluster):
    apis, servers = cluster["apis"], cluster["stack"]
    answers = [None] * 6

    def send(index):
        answers[index] = submit(apis[index % 2], small_job(index))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
    ids = [a.json()["job_id"] for a in answers]
    jobs = [wait_done(apis[0], job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 6, jobs
    for job_id in ids:
        assert read_job(apis[1], job_id) == read_job(apis[0], job_id)  # either instance answers alike
        assert len(versions_of(servers, job_id)) == 1
    assert len({(j["result"]["model"]["name"], j["result"]["model"]["version"]) for j in jobs}) == 6
    assert most_at_once(jobs) == 2  # two workers, one job each at a time: both busy at once, never more
    assert {job["worker"].split("@")[0] for job in jobs} == {"w0", "w1"}
    waits = [job["waited_seconds"] for job in jobs]
    assert max(waits) > min(waits)  # the later ones waited in the queue, none was refused
    print(f"\nburst of 6: longest wait {max(waits):.1f} s, at most {most_at_once(jobs)} at once")


def test_a_killed_worker_loses_no_job_and_leaves_one_version(cluster):
    apis, servers, workers = cluster["apis"], cluster["stack"], cluster["workers"]
    body = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 40}, "dataset": "digits",
            "model_name": "digits-survivor"}  # fmt: skip
    job_id = submit(apis[0], body).json()["job_id"]
    deadline = time.monotonic() + 120
    while (job := read_job(apis[0], job_id)).get("phase") != "fitting":
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline
        time.sleep(0.2)
    victim = next(w for w in workers if job["worker"].startswith(f"{w.name}@"))
    victim.kill()
    try:
        job = wait_done(apis[1], job_id, timeout=240)
    finally:
        workers[workers.index(victim)] = Worker(victim.name, cluster["env"], cluster["folder"]).start()
    versions = versions_of(servers, job_id)
    # TRAIN_MAX_ATTEMPTS=2: the lost attempt is retried on the other worker, and that attempt succeeds.
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2 and not job["worker"].startswith(f"{victim.name}@"), job
    assert job["lost_attempt"].startswith(f"Attempt 1 on {victim.name}@") and "was lost" in job["lost_attempt"], job
    assert [(v.name, str(v.version)) for v in versions] == [tuple(ref(job["result"]["model"]).values())]
    print(f"\nkilled worker: job {job['status']} on attempt {job.get('attempt')}, {job.get('elapsed_seconds')} s")


def test_read_your_writes_after_an_async_job(cluster):
    api = cluster["apis"][1]
    wine = {"estimator": "SVC", "dataset": "wine"}
    job_id = submit(api, wine).json()["job_id"]
    job = wait_done(api, job_id)
    assert job["status"] == "succeeded" and job["result"]["activated"], job
    example = requests.post(f"{api.url}/predict", json={}, timeout=30).json()["example"]
    for _ in range(8):  # every gunicorn worker of this instance: the new version, right after the answer
        answer = requests.post(f"{api.url}/predict", json=example, timeout=30, headers={"Connection": "close"})
        assert answer.status_code == 200, answer.text
        assert ref(answer.json()["model"]) == ref(job["result"]["model"])
    # The Celery worker registered the version with its drift baseline, and the instance counts against it.
    [version] = versions_of(cluster["stack"], job_id)
    [drift] = requests.get(f"{api.url}/drift", timeout=30).json()["models"]
    assert drift["version"] == str(version.version) and drift["baseline"]["sha256"] == version.tags[BASELINE_TAG]


def predict_example(api: Service) -> requests.Response:
    """A prediction with the active model's own example row. An activation on the other instance reaches
    this one's workers within their poll interval, one worker before another: a 400 whose example is
    another model's means the row was read from a worker that had not caught up yet, so it is sent once more."""
    answer = requests.post(f"{api.url}/predict", json={}, timeout=30)
    for _ in range(3):
        example = answer.json()["example"]
        answer = requests.post(f"{api.url}/predict", json=example, timeout=30, headers={"Connection": "close"})
        if answer.status_code != 400 or answer.json()["example"].keys() == example.keys():
            break
    return answer


def test_a_broker_outage_is_503_for_training_only_and_recovers(cluster):
    api, redis = cluster["apis"][0], cluster["redis"]
    assert predict_example(api).status_code == 200
    redis.stop()
    try:
        started = time.monotonic()
        refused = submit(api, small_job(0))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "training_unavailable"
        assert "queue cannot be reached" in refused.json()["message"]
        assert time.monotonic() - started < 20
        assert predict_example(api).status_code == 200
        assert requests.get(f"{api.url}/ready", timeout=30).status_code == 200
    finally:
        redis.start()
    answer = submit(api, {**small_job(1), "model_name": "after-outage"})
    assert answer.status_code == 202, answer.text
    assert wait_done(api, answer.json()["job_id"])["status"] == "succeeded"


def test_an_api_restart_loses_no_queued_or_running_job(cluster):
    api = cluster["apis"][0]
    ids = [submit(api, {**small_job(i), "model_name": f"restart-{i}"}).json()["job_id"] for i in range(4)]
    deadline = time.monotonic() + 120
    while not any(read_job(api, job_id)["status"] == "running" for job_id in ids):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    api.stop()
    api.start(timeout=300)
    jobs = [wait_done(api, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, jobs


def test_a_job_runs_through_sqs(stack, tmp_path):  # noqa: F811 - the imported fixture
    """Celery's SQS transport against moto's SQS (the moto server that holds the artifact bucket)."""
    from service import create_app

    moto = stack["s3"].url.removeprefix("http://")
    transport = {"region": "us-east-1", "is_secure": False, "visibility_timeout": 60, "polling_interval": 0.5}
    env = {**celery_env(stack, f"sqs://test:test@{moto}", transport), "TRAIN_QUEUE": f"training-{os.getpid()}",
           "AWS_DEFAULT_REGION": S3_ENV["AWS_DEFAULT_REGION"]}  # fmt: skip
    worker = Worker("sqs", env, tmp_path).start()
    try:
        config = {key: value for key, value in env.items() if key in Settings.model_fields}  # the rest is process env
        config.update(STATE_DIR=str(tmp_path / "api"), WATCH_REGISTRY=False, START_MODEL_STORE=False)
        config["TRAIN_TIME_LIMIT_SECONDS"] = TIME_LIMIT
        config["TRAIN_WORKER_CONCURRENCY"] = 1
        config["TRAIN_MAX_ATTEMPTS"] = 2
        client = create_app(config).test_client()
        body = {"estimator": "DecisionTreeClassifier", "dataset": "iris", "model_name": "via-sqs", "activate": False}
        answer = client.post("/train", json=body, headers=AUTH)
        assert answer.status_code == 202, answer.json
        deadline = time.monotonic() + 180
        while (job := client.get(answer.json["location"], headers=AUTH).json)["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        assert job["worker"].startswith("sqs@")
        assert len(versions_of(stack, job["job_id"])) == 1
    finally:
        worker.stop()
