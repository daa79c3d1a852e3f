"""POST /train and GET /train/jobs/<id>: every estimator, client data, bad requests, limits, failures."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service import create_app
from tests.conftest import client_of, mlflow_client, ref
from training.estimators import ESTIMATORS

PHASES = ("validating", "fitting", "evaluating", "converting", "registering", "plotting")


SMALL = {
    "RandomForestClassifier": {"n_estimators": 10},
    "ExtraTreesClassifier": {"n_estimators": 10},
    "GradientBoostingClassifier": {"n_estimators": 10},
    "HistGradientBoostingClassifier": {"max_iter": 10},
    "LogisticRegression": {"C": 0.5},
    "SVC": {"C": 2.0, "kernel": "rbf"},
    "KNeighborsClassifier": {"n_neighbors": 3},
    "DecisionTreeClassifier": {"max_depth": 3},
    "GaussianNB": {},
}


def version_count(store) -> int:
    return len(store["registry"].search_model_versions())


def customer_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """Client data with a text column, missing values and string labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        plan = ["basic", "pro", "enterprise"][i % 3]
        spend = float(rng.normal(100 if plan == "basic" else 300, 20))
        rows.append(
            {
                "plan": plan if i % 11 else None,
                "monthly_spend": round(spend, 2) if i % 7 else None,
                "seats": int(rng.integers(1, 50)),
                "churned": "yes" if plan == "basic" else "no",
            }
        )
    return rows


def wait_done(client, location: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.3)
    raise TimeoutError(location)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_trains_registers_and_serves(client, store, estimator):
    dataset = "wine" if estimator in ("SVC", "LogisticRegression") else "iris"
    body = {"estimator": estimator, "params": SMALL[estimator], "dataset": dataset, "wait": True}
    response = client.post("/train", json=body)
    assert response.status_code == 201, response.json
    result = response.json
    assert result["model"]["name"] == f"{dataset}-{estimator}"
    assert 0.5 < result["metrics"]["accuracy"] <= 1.0
    assert "f1_macro" in result["metrics"]
    listed = {(m["name"], m["version"]): m for m in client.get("/models").json["models"]}
    entry = listed[(result["model"]["name"], result["model"]["version"])]
    assert entry["active"] and entry["estimator"] == estimator and entry["dataset"] == dataset
    # In MLflow: the run's parameters, metrics, plot and per-class report.
    tracking = mlflow_client(store["uri"])
    run = tracking.get_run(result["run_id"])
    assert run.data.params["estimator"] == estimator
    assert run.data.metrics["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    artifacts = {a.path for a in tracking.list_artifacts(result["run_id"])}
    assert {"confusion_matrix.png", "classification_report.json", "dataset.json"} <= artifacts
    assert run.data.tags["sklearn_version"]
    # The next /predict, with the new features, is served by the new version.
    example = client.post("/predict", json={}).json["example"]
    answer = client.post("/predict", json=example)
    assert answer.status_code == 200
    assert ref(answer.json["model"]) == result["model"]


def test_job_is_queued_then_succeeds(client, store):
    response = client.post("/train", json={"estimator": "GaussianNB", "dataset": "breast_cancer"})
    assert response.status_code == 202
    assert response.json["status"] == "queued"
    assert response.headers["Location"] == response.json["location"] == f"/train/jobs/{response.json['job_id']}"
    job = wait_done(client, response.json["location"])
    assert job["status"] == "succeeded", job
    assert job["result"]["model"]["name"] == "breast_cancer-GaussianNB"
    assert store["registry"].get_active_model().name == "breast_cancer-GaussianNB"


def test_activate_false_registers_without_switching(client, store):
    body = {
        "estimator": "GaussianNB",
        "dataset": "iris",
        "model_name": "iris-nb-candidate",
        "activate": False,
        "wait": True,
    }
    response = client.post("/train", json=body)
    assert response.status_code == 201
    assert response.json["model"]["name"] == "iris-nb-candidate"
    assert store["registry"].get_active_model() == store["default"]
    assert ref(client.get("/ready").json["model"]) == store["default"].as_dict()


def test_inline_rows_with_text_and_missing_values(client):
    body = {"estimator": "RandomForestClassifier", "params": {"n_estimators": 20}, "data": customer_rows(),
            "target": "churned", "model_name": "churn", "wait": True}  # fmt: skip
    response = client.post("/train", json=body)
    assert response.status_code == 201, response.json
    answer = client.post("/predict", json={"plan": "basic", "monthly_spend": 95.0, "seats": 3})
    assert answer.status_code == 200, answer.json
    assert answer.json["predictions"] == ["yes"]
    assert set(answer.json["probabilities"][0]) == {"yes", "no"}
    # Text columns are text fields; columns that had gaps accept null; an unseen category still predicts.
    assert client.post("/predict", json={"plan": None, "monthly_spend": None, "seats": 3}).status_code == 200
    assert client.post("/predict", json={"plan": "startup", "monthly_spend": 310.0, "seats": 3}).status_code == 200
    wrong = client.post("/predict", json={"plan": 3, "monthly_spend": 95.0, "seats": 3})
    assert wrong.status_code == 400
    assert "plan" in wrong.json["errors"]
    spec = client.get("/openapi.json").json
    row = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert row["properties"]["plan"]["type"] == "string"
    assert row["properties"]["seats"]["type"] == "number"


def test_csv_upload_trains_and_predicts_raw_text(client, store):
    frame = pd.DataFrame(customer_rows(80, seed=1))
    data = {
        "file": (io.BytesIO(frame.to_csv(index=False).encode()), "customers.csv"),
        "target": "churned",
        "estimator": "LogisticRegression",
        "params": json.dumps({"C": 1.0}),
        "wait": "true",
    }
    response = client.post("/train", data=data, content_type="multipart/form-data")
    assert response.status_code == 201, response.json
    assert response.json["model"]["name"] == "customers-LogisticRegression"
    # The rows travel with the job's run, not through a local file: an artifact, and the run's input in MLflow.
    tracking = mlflow_client(store["uri"])
    run = tracking.get_run(response.json["run_id"])
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "customers" and logged.dataset.digest == run.data.params["dataset_digest"]
    assert {"plan", "monthly_spend", "seats"} <= {
        c["name"] for c in json.loads(logged.dataset.schema)["mlflow_colspec"]
    }
    assert "dataset/rows.json" in {a.path for a in tracking.list_artifacts(run.info.run_id, "dataset")}
    answer = client.post("/predict", json={"plan": "enterprise", "monthly_spend": 320.5, "seats": 12})
    assert answer.status_code == 200
    assert answer.json["predictions"] == ["no"]


ONE_CLASS = [{"x": float(i), "y": "a"} for i in range(20)]
MIXED_LABELS = [{"x": float(i), "y": [1, "b"][i % 2]} for i in range(20)]
RESERVED_COLUMN = [{"records": float(i), "y": "ab"[i % 2]} for i in range(20)]
FEW_ROWS = [{"x": float(i), "y": "ab"[i % 2]} for i in range(6)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"estimator": "NeuralNet", "dataset": "iris"}, "estimator"),
        ({"estimator": "RandomForestClassifier", "params": {"n_estimators": 100000}, "dataset": "iris"}, "n_estimators"),
        ({"estimator": "RandomForestClassifier", "params": {"n_estimators": "many"}, "dataset": "iris"}, "n_estimators"),
        ({"estimator": "RandomForestClassifier", "params": {"n_estimators": 10.5}, "dataset": "iris"}, "n_estimators"),
        ({"estimator": "RandomForestClassifier", "params": {"n_jobs": 64}, "dataset": "iris"}, "n_jobs"),
        ({"estimator": "SVC", "params": {"C": -1}, "dataset": "iris"}, "C"),
        ({"estimator": "LogisticRegression", "params": {"max_iter": 10**9}, "dataset": "iris"}, "max_iter"),
        ({"estimator": "SVC", "params": "C=1", "dataset": "iris"}, "params"),
        ({"estimator": "SVC"}, "dataset"),
        ({"estimator": "SVC", "dataset": "mnist"}, "dataset"),
        ({"estimator": "SVC", "dataset": "iris", "data": FEW_ROWS, "target": "y"}, "dataset"),
        ({"estimator": "SVC", "data": ONE_CLASS, "target": "y"}, "target"),
        ({"estimator": "SVC", "data": MIXED_LABELS, "target": "y"}, "mix types"),
        ({"estimator": "SVC", "data": RESERVED_COLUMN, "target": "y"}, "records"),
        ({"estimator": "SVC", "data": FEW_ROWS}, "target"),
        ({"estimator": "SVC", "data": FEW_ROWS, "target": "label"}, "target"),
        ({"estimator": "SVC", "data": FEW_ROWS, "target": "y"}, "target"),
        ({"estimator": "SVC", "data": [], "target": "y"}, "data"),
        ({"estimator": "SVC", "data": [1, 2], "target": "y"}, "data"),
        ({"estimator": "SVC", "dataset": "iris", "model_name": "../../etc"}, "model_name"),
        ({"estimator": "SVC", "dataset": "iris", "path": "/tmp/model.pkl"}, "path"),
    ],
    ids=["unknown_estimator", "out_of_bounds", "wrong_type", "float_for_int", "service_param", "negative_C",
         "max_iter_cap", "params_not_object", "no_dataset", "unknown_dataset", "two_sources", "one_class", "mixed_labels",
         "reserved_column",
         "missing_target", "target_not_a_column", "too_few_rows", "empty_data", "rows_not_objects",
         "bad_model_name", "unknown_field"],
)  # fmt: skip
def test_bad_training_request_is_400_and_registers_nothing(client, store, body, field):
    before = version_count(store)
    response = client.post("/train", json=body)
    assert response.status_code == 400, response.json
    assert response.json["error"] == "invalid_training_request"
    assert field in json.dumps(response.json["errors"])
    assert response.json["example"]["estimator"]
    assert version_count(store) == before


def test_oversized_data_is_400(store, app_config):
    app = create_app({**app_config, "TRAIN_MAX_ROWS": 50, "TRAIN_MAX_COLUMNS": 3})
    client = client_of(app)
    many_rows = client.post("/train", json={"estimator": "SVC", "data": customer_rows(60), "target": "churned"})
    assert many_rows.status_code == 400
    assert "at most 50" in json.dumps(many_rows.json["errors"])
    wide = [{**row, "extra": 1.0} for row in customer_rows(40)]
    too_wide = client.post("/train", json={"estimator": "SVC", "data": wide, "target": "churned"})
    assert too_wide.status_code == 400
    assert "at most 3 features" in json.dumps(too_wide.json["errors"])
    app.config["MAX_CONTENT_LENGTH"] = 1000
    too_big = client.post("/train", json={"estimator": "SVC", "data": customer_rows(40), "target": "churned"})
    assert too_big.status_code == 413


def test_unreadable_csv_is_400(client):
    data = {"file": (io.BytesIO(b"\x00\xff\xfe binary"), "x.csv"), "target": "y", "estimator": "SVC"}
    response = client.post("/train", data=data, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.json["error"] == "invalid_training_request"
    assert list(response.json["errors"]) == ["file"]
    assert response.json["errors"]["file"][0].startswith("not a readable CSV file"), response.json


def slow_job(**extra) -> dict:
    return {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 300}, "dataset": "digits", **extra}


def test_jobs_beyond_capacity_wait_queued_then_429(store, app_config):
    app = create_app({**app_config, "TRAIN_WORKER_CONCURRENCY": 1, "TRAIN_MAX_QUEUED": 1})
    client = client_of(app)
    slot = Path(app_config["STATE_DIR"]) / "train-slots" / "slot-0.lock"
    slot.parent.mkdir(parents=True, exist_ok=True)
    with open(slot, "a") as held:  # a running job holds the machine's only slot
        fcntl.flock(held, fcntl.LOCK_EX)
        first = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris", "activate": False})
        assert first.status_code == 202, first.json
        posted = time.time()
        time.sleep(1.5)
        waiting = client.get(first.json["location"]).json
        assert waiting["status"] == "queued"
        assert waiting["waited_seconds"] >= 1.5
        refused = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris"})
        assert refused.status_code == 429
        assert refused.headers["Retry-After"]
        assert refused.json["error"] == "too_many_jobs"
        released = time.time()
    job = wait_done(client, first.json["location"])
    done = time.time()
    assert job["status"] == "succeeded", job
    # It started only once the slot was free: it waited at least as long as the slot was held after it was queued,
    # and ran no longer than from then until now.
    assert job["waited_seconds"] >= max(1.5, released - posted), (job, released - posted)
    assert job["attempt"] == 1 and 0 < job["elapsed_seconds"] <= done - released, (job, done - released)


def test_running_job_shows_its_phase_and_elapsed_time(client, store):
    body = {**slow_job(activate=False), "params": {"n_estimators": 60}}
    submitted = time.time()
    location = client.post("/train", json=body).json["location"]
    deadline = time.monotonic() + 240
    seen, last = set(), None
    while True:
        job = client.get(location).json
        since = time.time() - submitted  # the job started after it was submitted: it cannot have run longer
        if job["status"] in ("succeeded", "failed"):
            break
        if job["status"] == "running":
            assert job["phase"] in PHASES
            # The phase began within the attempt, which began after the request; both clocks move on.
            assert 0 <= job["phase_elapsed_seconds"] <= job["elapsed_seconds"] + 0.001 <= since + 0.002, (job, since)
            if last is not None:
                assert job["elapsed_seconds"] > last["elapsed_seconds"], (last, job)
                if job["phase"] == last["phase"]:
                    assert job["phase_elapsed_seconds"] > last["phase_elapsed_seconds"], (last, job)
            seen.add(job["phase"])
            last = job
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    assert "fitting" in seen
    # (A read while the outcome was being written may have seen the job running a few ms past its finished_at.)
    assert last["elapsed_seconds"] - 0.5 <= job["elapsed_seconds"] <= since, (last, job, since)
    assert job["finished_at"]


def test_reading_a_job_writes_nothing(client, store):
    body = {"estimator": "GaussianNB", "dataset": "iris", "activate": False}
    location = client.post("/train", json=body).json["location"]
    job = wait_done(client, location)
    tracking = mlflow_client(store["uri"])
    before = tracking.get_run(job["job_id"]).data.tags
    for _ in range(3):
        assert client.get(location).json == job
    assert tracking.get_run(job["job_id"]).data.tags == before


def test_a_jobs_log_lines_carry_its_id(client, app_config):
    """The local executor's job logs to STATE_DIR/jobs/<id>.log in the service's format, its id on every line."""
    body = {"estimator": "GaussianNB", "dataset": "iris", "activate": False, "wait": True}
    response = client.post("/train", json=body)
    assert response.status_code == 201, response.json
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    folder = Path(app_config["STATE_DIR"]) / "jobs"
    deadline = time.monotonic() + 30  # the job's process removes its lock file once it has nothing left to log
    while (folder / f"{job_id}.lock").exists():
        assert time.monotonic() < deadline, "the job's process did not finish"
        time.sleep(0.1)
    lines = [json.loads(line) for line in (folder / f"{job_id}.log").read_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any("attempt 1 starts" in m for m in messages) and any("attempt 1 succeeded" in m for m in messages)
    assert all(line.get("job_id") == job_id for line in lines), lines


def test_job_over_its_time_limit_fails_and_registers_nothing(store, app_config):
    app = create_app({**app_config, "TRAIN_TIME_LIMIT_SECONDS": 1})
    client = client_of(app)
    before = version_count(store)
    response = client.post("/train", json=slow_job())
    job = wait_done(client, response.json["location"])
    assert job["status"] == "failed"
    assert "time limit" in job["error"]
    assert version_count(store) == before
    assert mlflow_client(store["uri"]).get_run(job["job_id"]).info.status == "FAILED"


def _fitting_pid(tracking, run_id: str) -> int:
    deadline = time.monotonic() + 60
    while tracking.get_run(run_id).data.tags.get("job.phase") != "fitting":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return int(tracking.get_run(run_id).data.tags["job.pid"])


def test_killed_job_is_reported_failed(store, app_config):
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 1})
    client = client_of(app)
    before = version_count(store)
    location = client.post("/train", json=slow_job()).json["location"]
    run_id = location.rsplit("/", 1)[1]
    os.kill(_fitting_pid(mlflow_client(store["uri"]), run_id), signal.SIGKILL)
    job = wait_done(client, location, timeout=60)
    assert job["status"] == "failed"
    assert "was lost" in job["error"] and "No attempts left" in job["error"]
    deadline = time.monotonic() + 30  # the job's process exits once it has recorded the failure
    while [p for p in os.listdir("/proc") if p.isdigit() and _is_job_of(p, run_id)]:
        assert time.monotonic() < deadline, "a process of the failed job survived"
        time.sleep(0.2)
    assert version_count(store) == before


def test_killed_attempt_is_retried_and_registers_one_version(store, app_config):
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 2})
    client = client_of(app)
    body = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 60}, "dataset": "digits",
            "activate": False, "model_name": "digits-retried"}  # fmt: skip
    location = client.post("/train", json=body).json["location"]
    run_id = location.rsplit("/", 1)[1]
    os.kill(_fitting_pid(mlflow_client(store["uri"]), run_id), signal.SIGKILL)
    job = wait_done(client, location, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2
    assert "Attempt 1" in job["lost_attempt"]
    assert len(mlflow_client(store["uri"]).search_model_versions(f"run_id = '{run_id}'")) == 1


def _parent_and_command(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return int(stat.rsplit(")", 1)[1].split()[1]), command


def test_job_process_is_forked_by_the_warm_parent(store, app_config):
    """A job's process is a child of the fork server (which imported the training code), not a fresh Python:
    the attempt's parent is the job's own process, named for its job, whose parent is the fork server."""
    app = create_app({**app_config, "TRAIN_MAX_ATTEMPTS": 1})
    executor = app.extensions["train_executor"]
    executor.start_fork_server()
    deadline = time.monotonic() + 120
    while not executor.fork_server.is_up():  # started in the background: the first jobs before it run cold
        assert time.monotonic() < deadline, "the fork server did not come up"
        time.sleep(0.2)
    client = client_of(app)
    location = client.post("/train", json=slow_job(activate=False)).json["location"]
    run_id = location.rsplit("/", 1)[1]
    attempt = _fitting_pid(mlflow_client(store["uri"]), run_id)
    job_process, attempt_command = _parent_and_command(attempt)
    server, job_command = _parent_and_command(job_process)
    assert job_command.startswith(f"training job {run_id}"), job_command
    assert os.getsid(job_process) == job_process  # its own session: killable alone, outlives the service
    assert "-m training.fork_server" in _parent_and_command(server)[1]
    assert str(executor.fork_server.socket_path) in _parent_and_command(server)[1]
    assert wait_done(client, location)["status"] == "succeeded"


def _is_job_of(pid: str, run_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return run_id.encode() in cmdline.read()
    except OSError:
        return False


@pytest.mark.parametrize(
    ("job_id", "error"),
    [("nope", "job_not_found"), ("0" * 32, "job_not_found"), ("Z" * 32, "job_not_found"),
     ("..%2F..%2Fetc%2Fpasswd", "not_found")],  # a slash in the id: no such endpoint
)  # fmt: skip
def test_unknown_job_is_404(client, job_id, error):
    response = client.get(f"/train/jobs/{job_id}")
    assert response.status_code == 404
    assert response.json["error"] == error, response.json
    if error == "job_not_found":
        assert response.json["message"] == f"No training job '{job_id}'."


def test_train_needs_the_token_when_configured(store, app_config):
    app = create_app(app_config)
    response = app.test_client().post("/train", json={"estimator": "GaussianNB", "dataset": "iris"})
    assert response.status_code == 401
    assert app.test_client().get(f"/train/jobs/{'0' * 32}").status_code == 401


# ---- concurrent attempts of one job (a broker's redelivery while the first taker still works) -----------
def _new_job(registry, estimator="DecisionTreeClassifier", dataset="iris", **params) -> str:
    from training.spec import TrainingSpec
    from training.submitter import create_job

    return create_job(registry, TrainingSpec(estimator, params, activate=False), dataset, max_queued=100)


def test_a_redelivery_while_the_attempt_beats_leaves_the_job_to_it(store):
    """A second delivery finds attempt 1 heard from within the lease: it writes nothing and says busy;
    once the lease has passed without a beat, the next delivery takes over and records the lost one."""
    from training.attempt import LEASE_SECONDS, AttemptOutcome, execute_job

    registry = store["registry"]
    job_id = _new_job(registry)
    beat = repr(time.time() - 2)
    registry.set_run_tags(job_id, {"job.status": "running", "job.attempt": "1", "job.attempt_id": "first",
                                   "job.worker": "elsewhere:1", "job.started_at": beat, "job.heartbeat_at": beat})  # fmt: skip
    before = registry.client.get_run(job_id).data.tags
    assert execute_job(registry, job_id, 2, "here:2", 60) is AttemptOutcome.BUSY
    assert registry.client.get_run(job_id).data.tags == before

    stale = repr(time.time() - LEASE_SECONDS - 1)
    registry.set_run_tags(job_id, {"job.started_at": stale, "job.heartbeat_at": stale})
    assert execute_job(registry, job_id, 2, "here:2", 60) is AttemptOutcome.SUCCEEDED
    tags = registry.client.get_run(job_id).data.tags
    assert tags["job.attempt"] == "2" and "Attempt 1 on elsewhere:1 was lost" in tags["job.lost"]
    assert len(registry.client.search_model_versions(f"run_id = '{job_id}'")) == 1


def test_a_superseded_attempt_stops_and_registers_nothing(store):
    """Another attempt took the job over while this one fitted: it stops at its next phase, registers
    nothing and writes no outcome; the record stays the new owner's."""
    import threading

    from training.attempt import AttemptOutcome, execute_job

    registry = store["registry"]
    job_id = _new_job(registry, "GradientBoostingClassifier", "digits", n_estimators=60)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=execute_job(registry, job_id, 2, "here:1", 120)))
    thread.start()
    deadline = time.monotonic() + 60
    while registry.client.get_run(job_id).data.tags.get("job.phase") != "fitting":
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    registry.client.set_tag(job_id, "job.attempt_id", "the-new-owner")
    thread.join(timeout=120)
    assert outcome["result"] is AttemptOutcome.SUPERSEDED
    tags = registry.client.get_run(job_id).data.tags
    assert tags["job.status"] == "running" and tags["job.attempt_id"] == "the-new-owner"
    assert "model_version" not in tags
    assert registry.client.search_model_versions(f"run_id = '{job_id}'") == []


def test_a_superseded_attempt_withdraws_the_version_it_registered_and_activated(store, monkeypatch):
    """Taken over after registering (the job activates its version, then another attempt owns the job):
    the version goes, and the active model goes back to the previous one."""
    from kernel.registry import ModelRef
    from training.attempt import AttemptOutcome, execute_job
    from training.spec import TrainingSpec
    from training.submitter import create_job

    registry = store["registry"]
    registry.set_active_model(store["default"])
    activate = registry.set_active_model
    seen = {}

    def activate_then_lose_the_job(ref):
        activate(ref)
        if not seen:  # the job's own activation; the second call is the hand-back
            seen.update(activated=ref, versions=registry.client.search_model_versions(f"run_id = '{job_id}'"))
            registry.client.set_tag(job_id, "job.attempt_id", "the-new-owner")

    try:
        job_id = create_job(registry, TrainingSpec("DecisionTreeClassifier", model_name="withdrawn"), "iris", 100)
        monkeypatch.setattr(registry, "set_active_model", activate_then_lose_the_job)
        assert execute_job(registry, job_id, 1, "here:1", 60) == AttemptOutcome.SUPERSEDED
        monkeypatch.undo()
        # It had registered and activated its version before it was taken over ...
        assert seen["activated"].name == "withdrawn"
        registered = [ModelRef(mv.name, str(mv.version)) for mv in seen["versions"]]
        assert registered == [seen["activated"]]
        # ... and the version is gone, the previous model active again, the record the new owner's.
        assert registry.client.search_model_versions(f"run_id = '{job_id}'") == []
        assert registry.get_active_model() == store["default"]
        tags = registry.client.get_run(job_id).data.tags
        assert tags["job.status"] == "running" and tags["job.attempt_id"] == "the-new-owner"
        assert ModelRef(tags["model_name"], tags["model_version"]) == seen["activated"]
    finally:
        monkeypatch.undo()
        registry.set_active_model(store["default"])
