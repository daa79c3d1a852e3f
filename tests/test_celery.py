"""Training on Celery workers (TRAIN_EXECUTOR=celery): real Redis, two workers, two API instances under gunicorn,
an `mlflow server` on PostgreSQL with S3 (moto) artifacts, and Celery's SQS transport against moto's SQS.

Redis runs as this module's own `redis-server` on a free port, so a test can stop and start it. Where
`redis-server` is missing the tests skip; CI sets REQUIRE_REDIS=1, which makes that a failure.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime

import pytest
import requests

from kernel.config import Settings
from kernel.drift_format import BASELINE_TAG
from kernel.registry import Registry
from tests.celery_helpers import (
    AUTH,
    TOKEN,
    RedisServer,
    Worker,
    client_wait,
    late_redelivery_writes_nothing,
    require_redis,
    start_fitting,
    versions_of,
)
from tests.conftest import mlflow_client, ref
from tests.servers import Service
from tests.test_production import S3_ENV, service_env, stack  # noqa: F401 - `stack` is a fixture used here
from training.attempt import LEASE_SECONDS, hard_time_limit
from training.job_keeper import KEEP_SECONDS
from training.job_record import QUEUED_GRACE_SECONDS
from training.spec import TrainingSpec
from training.submitter import create_job

pytestmark = pytest.mark.drill

# Hard limit 55 s, so the broker's visibility timeout is the service's default for it: 85 s. A vanished worker's
# job is sent again by the other worker's keeper well before (training/job_keeper.py), which the drill checks.
TIME_LIMIT = 45
TRANSPORT: dict = {}  # the service's defaults (training/celery_executor.make_celery)


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
    killed = time.time()
    try:
        job = wait_done(apis[1], job_id, timeout=240)
    finally:
        workers[workers.index(victim)] = Worker(victim.name, cluster["env"], cluster["folder"]).start()
    versions = versions_of(servers, job_id)
    # Not the broker's visibility timeout (85 s here, 690 s at the defaults): the other worker's keeper sent the
    # job again once its attempt was silent past the lease (30 s), within a sweep (10 s).
    restarted = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp() - killed
    assert restarted < LEASE_SECONDS + KEEP_SECONDS + 15, f"attempt 2 started {restarted:.0f} s after the kill"
    # TRAIN_MAX_ATTEMPTS=2: the lost attempt is retried on the other worker, and that attempt succeeds.
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2 and not job["worker"].startswith(f"{victim.name}@"), job
    assert job["lost_attempt"].startswith(f"Attempt 1 on {victim.name}@") and "was lost" in job["lost_attempt"], job
    assert [(v.name, str(v.version)) for v in versions] == [tuple(ref(job["result"]["model"]).values())]
    print(f"\nkilled worker: attempt 2 started {restarted:.1f} s after the kill; job {job['status']}")
    late = late_redelivery_writes_nothing(servers, job_id, lambda: [w.log_path for w in workers + [victim]])
    print(f"the killed attempt's own message came back {late - killed:.0f} s after the kill and wrote nothing")


def test_a_job_the_api_never_sent_runs_once_after_the_grace(cluster):
    """The API died between recording a job and sending it: no message in the broker. A keeper sends it."""
    servers, api = cluster["stack"], cluster["apis"][0]
    registry = Registry(servers["uri"], "model-serving")
    spec = TrainingSpec("DecisionTreeClassifier", {}, "never-sent", False)
    job_id = create_job(registry, spec, "iris", max_queued=100, queue="training")  # POST /train, before it sends
    job = wait_done(api, job_id, timeout=QUEUED_GRACE_SECONDS + KEEP_SECONDS + 120)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert job["waited_seconds"] >= QUEUED_GRACE_SECONDS, job  # not before the grace: the API might be sending it
    assert len(versions_of(servers, job_id)) == 1
    logs = "".join(worker.log_path.read_text() for worker in cluster["workers"])
    assert f"training job {job_id}: queued" in logs, "no keeper said it sent the job again"


def test_an_attempt_stuck_where_the_soft_limit_cannot_reach_it_is_killed_at_the_hard_limit(cluster, tmp_path):
    """A worker with a 5 s limit (hard 15 s, inside the keeper's 30 s lease) on a queue of its own; the attempt is
    frozen (SIGSTOP) while it fits, as deaf to the soft limit as a C call that never returns to Python."""
    from service import create_app

    env = {
        **cluster["env"],
        "TRAIN_TIME_LIMIT_SECONDS": "5",
        "TRAIN_QUEUE": "training-short",
        "TRAIN_MAX_ATTEMPTS": "1",
    }
    hard = hard_time_limit(5)
    worker = Worker("short", env, tmp_path).start()
    try:
        config = {key: value for key, value in env.items() if key in Settings.model_fields}
        config.update(STATE_DIR=str(tmp_path / "api"), WATCH_REGISTRY=False, START_MODEL_STORE=False)
        client = create_app(config).test_client()
        slow = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 300}, "dataset": "digits",
                "model_name": "stuck", "activate": False}  # fmt: skip
        answer, job = start_fitting(client, slow)
        pid = int(mlflow_client(cluster["stack"]["uri"]).get_run(job["job_id"]).data.tags["job.pid"])
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        job = client_wait(client, answer, timeout=60)
        assert job["status"] == "failed" and "time limit" in job["error"], job
        assert time.monotonic() - stopped < 40, "the stuck attempt outlived the hard limit by far"
        # The hard limit's kill, not the soft limit (which would end it near 5 s): the attempt ran until `hard`.
        assert job["elapsed_seconds"] >= hard - 1, job
        assert versions_of(cluster["stack"], job["job_id"]) == []
    finally:
        worker.stop()


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


def test_a_job_runs_through_sqs_and_a_killed_workers_job_is_sent_again(stack, tmp_path):  # noqa: F811 - the fixture
    """Celery's SQS transport against moto's SQS (the moto server that holds the artifact bucket), two workers at
    the default visibility timeout: a small job runs, and a killed worker's job restarts on the other in a minute."""
    from service import create_app

    moto = stack["s3"].url.removeprefix("http://")
    transport = {"region": "us-east-1", "is_secure": False, "polling_interval": 0.5}
    env = {**celery_env(stack, f"sqs://test:test@{moto}", transport), "TRAIN_QUEUE": f"training-{os.getpid()}",
           "AWS_DEFAULT_REGION": S3_ENV["AWS_DEFAULT_REGION"]}  # fmt: skip
    workers = [Worker(f"sqs{i}", env, tmp_path).start() for i in range(2)]
    try:
        config = {key: value for key, value in env.items() if key in Settings.model_fields}  # the rest is process env
        config.update(STATE_DIR=str(tmp_path / "api"), WATCH_REGISTRY=False, START_MODEL_STORE=False)
        config.update(TRAIN_TIME_LIMIT_SECONDS=TIME_LIMIT, TRAIN_WORKER_CONCURRENCY=1, TRAIN_MAX_ATTEMPTS=2)
        client = create_app(config).test_client()
        body = {"estimator": "DecisionTreeClassifier", "dataset": "iris", "model_name": "via-sqs", "activate": False}
        job = client_wait(client, client.post("/train", json=body, headers=AUTH))
        assert job["status"] == "succeeded", job
        assert job["worker"].startswith("sqs")
        assert len(versions_of(stack, job["job_id"])) == 1
        slow = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 40}, "dataset": "digits",
                "model_name": "sqs-survivor", "activate": False}  # fmt: skip
        answer, job = start_fitting(client, slow)
        victim = next(w for w in workers if job["worker"].startswith(f"{w.name}@"))
        victim.kill()
        killed = time.time()
        job = client_wait(client, answer)
        restarted = datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp() - killed
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        assert restarted < LEASE_SECONDS + KEEP_SECONDS + 15, f"attempt 2 started {restarted:.0f} s after the kill"
        assert len(versions_of(stack, job["job_id"])) == 1
        print(f"\nSQS, killed worker: attempt 2 started {restarted:.1f} s after the kill")
        late = late_redelivery_writes_nothing(stack, job["job_id"], lambda: [w.log_path for w in workers])
        print(f"SQS: the killed attempt's own message came back {late - killed:.0f} s after the kill, wrote nothing")
    finally:
        for worker in workers:
            worker.stop()
