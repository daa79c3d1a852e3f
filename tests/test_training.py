"""POST /train: every estimator, client data, bad requests, limits, the token (its jobs: test_training_jobs.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from service import create_app
from tests.conftest import client_of, mlflow_client, ref
from tests.training_helpers import version_count
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


def test_the_signature_is_built_from_the_validated_columns_as_mlflow_would_infer_it(monkeypatch):
    """A version's signature is not inferred (`infer_signature` is not called), and it is what MLflow would infer."""
    from mlflow.models import infer_signature

    import training.registration
    from training.datasets import BUILTIN_DATASETS, from_records, load_builtin
    from training.registration import signature_of

    limits = {"max_rows": 10_000, "max_columns": 100}
    text_labels = [{**row, "churned": "yes" if row["churned"] == "yes" else "no"} for row in customer_rows()]
    datasets = [load_builtin(name) for name in BUILTIN_DATASETS] + [from_records(text_labels, "churned", limits)]
    # A model's classes: numbers, text in an object array, or text in a fixed-width one (GaussianNB on breast_cancer)
    classes = [np.unique(d.labels) for d in datasets] + [np.array(["benign", "malignant"])]
    datasets.append(datasets[2])
    expected = [infer_signature(d.features, c).to_dict() for d, c in zip(datasets, classes, strict=True)]

    def inferred(*args, **kwargs):
        raise AssertionError("the signature was inferred")

    monkeypatch.setattr(training.registration, "infer_signature", inferred)
    built = [signature_of(d.features, c).to_dict() for d, c in zip(datasets, classes, strict=True)]
    assert built == expected
    inputs = {column["name"]: column for column in json.loads(built[-2]["inputs"])}
    assert inputs["plan"]["type"] == "string" and inputs["plan"]["required"] is False  # text with gaps
    assert inputs["seats"] == {"type": "double", "name": "seats", "required": True}
    assert json.loads(built[-2]["outputs"])[0]["tensor-spec"]["dtype"] == "object"  # text labels
    assert json.loads(built[-1]["outputs"])[0]["tensor-spec"]["dtype"] == "str"


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
