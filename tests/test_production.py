"""The service as teams run it: gunicorn with 4 workers, an MLflow server on PostgreSQL with S3 artifacts.

Everything runs on loopback ports and is stopped at the end. The PostgreSQL tests skip where it is not
reachable; CI sets REQUIRE_POSTGRES=1, so there they must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.conftest import AUTH, DEFAULT_NAME, ROOT, ref
from tests.servers import S3Server, Service, create_database, drop_database, require_postgres, start_mlflow_server

BUCKET = "mlflow-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL backend store (a fresh database) + S3 artifact store (moto) + `mlflow server`."""
    require_postgres()
    folder = tmp_path_factory.mktemp("stack")
    database = create_database()
    s3 = S3Server(folder)
    process = log = None
    try:
        s3.start()
        s3.create_bucket(BUCKET)
        env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.url}
        process, uri, log = start_mlflow_server(
            f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}", f"s3://{BUCKET}/mlflow", folder, env
        )
        yield {"uri": uri, "folder": folder, "s3": s3, "database": database}
    finally:
        from tests.conftest import stop

        if process is not None:
            stop(process)
        if log is not None:
            log.close()
        s3.stop()
        drop_database(database)


def service_env(stack, state_dir, **extra) -> dict:
    return {"MLFLOW_TRACKING_URI": stack["uri"], "STATE_DIR": str(state_dir), "ACTIVE_POLL_SECONDS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **{k: str(v) for k, v in extra.items()}}  # fmt: skip


def train_cli(stack, *args) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack["uri"]}
    done = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["model"]


# Between versicolor and virginica: the two versions swapped below give it different probabilities (on a
# clear setosa row both answer 1.0), so an answer mixing them would show.
BORDER_ROW = {"sepal_length_cm": 6.0, "sepal_width_cm": 2.7, "petal_length_cm": 5.1, "petal_width_cm": 1.6}


def predict(url: str) -> requests.Response:
    # A new connection per request, so the kernel spreads them over the workers.
    return requests.post(f"{url}/predict", json=BORDER_ROW, timeout=30, headers={"Connection": "close"})


@pytest.fixture(scope="module")
def gunicorn_service(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gunicorn")
    service = Service(service_env(stack, folder / "state"), folder, workers=4).start()
    yield service
    service.stop()


def test_four_workers_on_an_empty_registry_bootstrap_one_version(gunicorn_service, stack):
    models = requests.get(f"{gunicorn_service.url}/models", timeout=30).json()["models"]
    assert [(m["name"], m["version"], m["active"]) for m in models] == [(DEFAULT_NAME, "1", True)]
    assert gunicorn_service.log_text().count("empty registry: training the default model") == 1
    # The artifacts went to the S3 bucket through the tracking server.
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack["s3"].url, **{k.lower(): v for k, v in S3_ENV.items()
                                                              if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")  # fmt: skip
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(key.endswith("model.skops") for key in keys)


def client_under_swaps(url, expected, state, stats, pids, lock, done, stop_at) -> None:
    """One keep-alive client of the swap drill: POSTs until `done` (or `stop_at`), counting in `stats` what failed,
    what mixed two versions, and what did not come from the version `state` says is settled."""
    session = requests.Session()
    while not done.is_set() and time.monotonic() < stop_at:
        with lock:
            settled, generation = state["settled"], state["generation"]
        try:
            answer = session.post(f"{url}/predict", json=BORDER_ROW, timeout=30)
            body = answer.json()
            ok = answer.status_code == 200
            mixed = ok and body["probabilities"][0] != expected[body["model"]["name"]]
        except (requests.RequestException, ValueError):
            ok, mixed = False, False
        with lock:
            stats["sent"] += 1
            stats["failed"] += not ok
            stats["mixed"] += mixed
            if ok:
                pids.add(answer.headers["X-Worker-Pid"])
            if ok and settled is not None and generation == state["generation"]:
                stats["checked"] += 1
                stats["stale"] += ref(body["model"]) != settled


def test_swaps_reach_every_worker_at_once_and_never_mix(gunicorn_service, stack):
    url = gunicorn_service.url
    alternative = train_cli(stack, "--estimator", "GaussianNB", "--dataset", "iris", "--model-name", "iris-nb",
                            "--no-activate")  # fmt: skip
    versions = [{"name": DEFAULT_NAME, "version": "1"}, alternative]
    expected = {}
    for version in versions:
        assert requests.post(f"{url}/use-model", json=version, timeout=60, headers=AUTH).status_code == 200
        expected[version["name"]] = predict(url).json()["probabilities"][0]
    assert expected[DEFAULT_NAME] != expected["iris-nb"]

    # `settled` is the version every answer must come from, for a request sent after /use-model answered and
    # before the next swap was posted (None while a swap is in flight). The 8 keep-alive clients are spread
    # over the 4 workers (least connections), so their answers check every worker, not one that happens to
    # take the fresh connections below.
    stats = {"sent": 0, "failed": 0, "mixed": 0, "stale": 0, "checked": 0}
    state = {"settled": None, "generation": 0}
    pids: set[str] = set()
    lock = threading.Lock()
    stop_at = time.monotonic() + 90
    done = threading.Event()

    shared = (url, expected, state, stats, pids, lock, done, stop_at)
    threads = [threading.Thread(target=client_under_swaps, args=shared) for _ in range(8)]
    for thread in threads:
        thread.start()
    worst_first_answer = 0.0
    try:
        for swap in range(12):
            target = versions[swap % 2]
            with lock:
                state["settled"], state["generation"] = None, state["generation"] + 1
            assert requests.post(f"{url}/use-model", json=target, timeout=60, headers=AUTH).status_code == 200
            with lock:
                state["settled"] = target
            for _ in range(24):  # right after the answer, on fresh connections too
                started = time.perf_counter()
                answer = predict(url)
                worst_first_answer = max(worst_first_answer, time.perf_counter() - started)
                assert answer.status_code == 200
                assert ref(answer.json()["model"]) == target
                with lock:
                    pids.add(answer.headers["X-Worker-Pid"])
    finally:
        done.set()
        for thread in threads:
            thread.join()
    print(f"\nswap under load: {stats}; slowest answer right after a swap {worst_first_answer * 1000:.0f} ms")
    assert len(pids) == 4, f"only {len(pids)} workers answered: {sorted(pids)}"
    assert stats["checked"] > 100, stats
    assert stats == {**stats, "failed": 0, "mixed": 0, "stale": 0}


def test_restart_serves_the_last_chosen_version(gunicorn_service, stack):
    target = {"name": "iris-nb", "version": "1"}
    assert requests.post(f"{gunicorn_service.url}/use-model", json=target, timeout=60, headers=AUTH).status_code == 200
    gunicorn_service.stop()
    gunicorn_service.start()
    assert ref(requests.get(f"{gunicorn_service.url}/ready", timeout=30).json()["model"]) == target
    assert ref(predict(gunicorn_service.url).json()["model"]) == target


def test_two_instances_follow_each_others_swaps(stack, tmp_path):
    first = Service(service_env(stack, tmp_path / "a"), tmp_path, workers=2).start()
    second = Service(service_env(stack, tmp_path / "b"), tmp_path, workers=2).start()
    try:
        for source, follower, target in (
            (first, second, {"name": DEFAULT_NAME, "version": "1"}),
            (second, first, {"name": "iris-nb", "version": "1"}),
        ):
            assert requests.post(f"{source.url}/use-model", json=target, timeout=60, headers=AUTH).status_code == 200
            swapped = time.monotonic()
            streak = 0
            while streak < 10:  # ten answers in a row from the new version: every worker followed
                assert time.monotonic() - swapped < 15, "the other instance did not follow within 15 s"
                streak = streak + 1 if ref(predict(follower.url).json()["model"]) == target else 0
            print(f"\nother instance followed in {time.monotonic() - swapped:.2f} s (poll interval 1 s)")
    finally:
        first.stop()
        second.stop()
