"""POST /train and GET /train/jobs/<id>: every estimator, client data, bad requests, limits, failures."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from serving import create_app
from tests.conftest import client_of, ref
from training.estimators import ESTIMATORS

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
    tracking = MlflowClient(store["uri"])
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


def test_csv_upload_trains_and_predicts_raw_text(client):
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


def test_over_the_job_limit_is_429(store, app_config, tmp_path):
    app = create_app({**app_config, "TRAIN_MAX_CONCURRENT_JOBS": 1})
    slot = tmp_path / "state" / "train-slots" / "slot-0.lock"
    slot.parent.mkdir(parents=True, exist_ok=True)
    with open(slot, "a") as held:  # a running job holds the only slot
        fcntl.flock(held, fcntl.LOCK_EX)
        response = client_of(app).post("/train", json={"estimator": "GaussianNB", "dataset": "iris"})
    assert response.status_code == 429
    assert response.headers["Retry-After"]
    assert response.json["error"] == "too_many_jobs"
    freed = client_of(app).post("/train", json={"estimator": "GaussianNB", "dataset": "iris", "activate": False})
    assert freed.status_code == 202
    assert wait_done(client_of(app), freed.json["location"])["status"] == "succeeded"


def test_job_over_its_time_limit_fails_and_registers_nothing(store, app_config):
    app = create_app({**app_config, "TRAIN_TIME_LIMIT_SECONDS": 1})
    client = client_of(app)
    before = version_count(store)
    body = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 300}, "dataset": "digits"}
    response = client.post("/train", json=body)
    job = wait_done(client, response.json["location"])
    assert job["status"] == "failed"
    assert "time limit" in job["error"]
    assert version_count(store) == before
    assert MlflowClient(store["uri"]).get_run(job["job_id"]).info.status == "FAILED"


def test_killed_job_is_reported_failed(client, store):
    before = version_count(store)
    body = {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 300}, "dataset": "digits"}
    location = client.post("/train", json=body).json["location"]
    tracking = MlflowClient(store["uri"])
    run_id = location.rsplit("/", 1)[1]
    deadline = time.monotonic() + 60
    while "job.pid" not in tracking.get_run(run_id).data.tags:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(int(tracking.get_run(run_id).data.tags["job.pid"]), signal.SIGKILL)
    job = wait_done(client, location, timeout=30)
    assert job["status"] == "failed"
    assert "ended without reporting" in job["error"]
    # The training child dies with its supervisor: nothing may appear, even after the job would have finished.
    time.sleep(1)
    assert version_count(store) == before
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_job_of(p, run_id)], "a training process survived"


def _is_job_of(pid: str, run_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return run_id.encode() in cmdline.read()
    except OSError:
        return False


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "Z" * 32, "..%2F..%2Fetc%2Fpasswd"])
def test_unknown_job_is_404(client, job_id):
    response = client.get(f"/train/jobs/{job_id}")
    assert response.status_code == 404
    assert response.is_json


def test_train_needs_the_token_when_configured(store, app_config):
    app = create_app({**app_config, "API_TOKEN": "t0ken"})
    response = app.test_client().post("/train", json={"estimator": "GaussianNB", "dataset": "iris"})
    assert response.status_code == 401
