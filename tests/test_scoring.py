"""MLflow's scoring protocol in full: a client written for `mlflow models serve` works unchanged."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import mlflow
import pandas as pd
import pytest
import requests
from mlflow.pyfunc.scoring_server.client import ScoringServerClient

from tests.conftest import IRIS_ROW, ROOT, free_port, stop
from tests.servers import BIN, Service

TOKEN = "scoring-test-" + uuid.uuid4().hex
CSV = (
    "sepal_length_cm,sepal_width_cm,petal_length_cm,petal_width_cm\n5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n5.9,3.0,4.2,1.5\n"
)


@pytest.mark.parametrize("path", ["/invocations", "/predict"])
def test_csv_body_with_header_row(client, path):
    csv = client.post(path, data=CSV, content_type="text/csv; charset=utf-8")
    assert csv.status_code == 200, csv.json
    as_json = client.post(path, json={"dataframe_split": pd.read_csv(io.StringIO(CSV)).to_dict(orient="split")})
    assert csv.json["predictions"] == as_json.json["predictions"] == ["setosa", "virginica", "versicolor"]


@pytest.mark.parametrize(
    ("body", "content_type", "error_code"),
    [
        ("sepal_length_cm,sepal_width_cm\n5.1,3.5\n", "text/csv", "INVALID_PARAMETER_VALUE"),  # missing columns
        ("sepal_length_cm,sepal_width_cm,petal_length_cm,petal_width_cm\n", "text/csv", "INVALID_PARAMETER_VALUE"),
        ('{"instances": [[1, 2, 3, 4]], "params": [1]}', "application/json", "INVALID_PARAMETER_VALUE"),
        ("", "text/csv", "BAD_REQUEST"),  # nothing at all
        (b"\xff\xfe\x00", "text/csv", "BAD_REQUEST"),  # not UTF-8
        ('{"dataframe_records": [1', "application/json", "BAD_REQUEST"),  # malformed JSON
        ("a=1", "application/x-www-form-urlencoded", "BAD_REQUEST"),  # neither JSON nor CSV
    ],
)
def test_invocations_errors_carry_mlflow_error_code(client, body, content_type, error_code):
    answer = client.post("/invocations", data=body, content_type=content_type)
    assert 400 <= answer.status_code < 500
    assert answer.json["error_code"] == error_code
    assert answer.json["error"] and answer.json["message"]
    assert "error_code" not in client.post("/predict", data=body, content_type=content_type).json


def test_params_are_accepted_and_ignored(client):
    plain = client.post("/predict", json={"records": [IRIS_ROW]})
    with_params = client.post("/predict", json={"records": [IRIS_ROW], "params": {"top_k": 3}})
    assert with_params.status_code == 200, with_params.json
    # The same answer; only the prediction ids differ (new ones for every request).
    assert {**with_params.json, "prediction_ids": None} == {**plain.json, "prediction_ids": None}
    assert len(with_params.json["prediction_ids"]) == 1
    # Beside the one-row form, "params" stays a feature name (and so is unknown to this model).
    assert client.post("/predict", json={**IRIS_ROW, "params": {}}).status_code == 400


def test_version_and_documented_routes(client):
    version = client.get("/version")
    assert version.status_code == 200 and version.get_data(as_text=True) == mlflow.__version__
    paths = client.get("/openapi.json").json["paths"]
    assert {"/ping", "/version", "/invocations"} <= set(paths)
    content = paths["/invocations"]["post"]["requestBody"]["content"]
    example = pd.read_csv(io.StringIO(content["text/csv"]["example"]))
    assert client.post("/invocations", data=content["text/csv"]["example"], content_type="text/csv").status_code == 200
    assert list(example.columns) == content["application/json"]["example"]["dataframe_split"]["columns"]


def test_body_over_the_limit_on_invocations(app):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    answer = app.test_client().post("/invocations", data=CSV * 40, content_type="text/csv")
    assert answer.status_code == 413 and answer.json["error_code"] == "BAD_REQUEST"


# ---- against a real `mlflow models serve` on the same registered version ----------------------------------
@pytest.fixture(scope="module")
def customers_model(store):
    from training.datasets import from_csv
    from training.run import run_training
    from training.spec import TrainingSpec

    dataset = from_csv((ROOT / "examples" / "customers.csv").read_bytes(), "churned",
                       {"max_rows": 10_000, "max_columns": 10}, "customers.csv")  # fmt: skip
    spec = TrainingSpec("RandomForestClassifier", {"n_estimators": 30}, model_name="scoring-customers", activate=False)
    return run_training(store["registry"], spec, dataset)["model"], dataset


def mlflow_models_serve(uri: str, model: dict, folder):
    port = free_port()
    log = open(folder / f"mlflow-serve-{port}.log", "w")  # noqa: SIM115 - closed by the caller
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs `uvicorn` from PATH  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model['name']}/{model['version']}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, port, log


def test_scoring_server_client_gets_what_mlflow_models_serve_gives(store, customers_model, tmp_path):
    model, dataset = customers_model
    rows = dataset.features.sample(25, random_state=1)
    assert rows["monthly_spend"].isna().any() or dataset.features["monthly_spend"].isna().any()
    rows = pd.concat([rows, dataset.features[dataset.features["monthly_spend"].isna()].head(3)])  # missing values too
    env = {"MLFLOW_TRACKING_URI": store["uri"], "STATE_DIR": str(tmp_path / "state"), "API_TOKEN": TOKEN}
    service = Service(env, tmp_path, workers=2).start()
    reference, port, log = mlflow_models_serve(store["uri"], model, tmp_path)
    try:
        swap = requests.post(f"{service.url}/use-model", json=model, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=60)  # fmt: skip
        assert swap.status_code == 200, swap.text
        ours = ScoringServerClient("127.0.0.1", service.port)
        theirs = ScoringServerClient("127.0.0.1", port)
        theirs.wait_server_ready(timeout=180, scoring_server_proc=reference)
        ours.ping()
        assert ours.get_version() == theirs.get_version() == mlflow.__version__
        expected = list(theirs.invoke(rows)["predictions"])
        assert set(expected) == {"yes", "no"}
        assert list(ours.invoke(rows)["predictions"]) == expected
        assert list(ours.invoke(rows, params={"threshold": 0.3})["predictions"]) == expected
        assert list(theirs.invoke(rows, params={"threshold": 0.3})["predictions"]) == expected
        # The same raw bodies to both: JSON forms with params, and CSV with a header row.
        split = rows.astype(object).where(rows.notna(), None).to_dict(orient="split", index=False)
        bodies = [
            ({"dataframe_split": split, "params": {"x": 1}}, "application/json"),
            ({"dataframe_records": rows.astype(object).where(rows.notna(), None).to_dict(orient="records")},
             "application/json"),
            (rows.to_csv(index=False), "text/csv"),
        ]  # fmt: skip
        for body, content_type in bodies:
            sent = {"json": body} if content_type == "application/json" else {"data": body}
            headers = {"Content-Type": content_type}
            mine = requests.post(f"{service.url}/invocations", headers=headers, timeout=30, **sent)
            reference_answer = requests.post(
                f"http://127.0.0.1:{port}/invocations", headers=headers, timeout=30, **sent
            )
            assert reference_answer.status_code == mine.status_code == 200, (reference_answer.text, mine.text)
            assert mine.json()["predictions"] == reference_answer.json()["predictions"] == expected
        # Rows that do not fit the model: both answer 400 with the same error_code.
        bad = {"dataframe_split": {"columns": ["plan"], "data": [["basic"]]}}
        for url in (service.url, f"http://127.0.0.1:{port}"):
            answer = requests.post(f"{url}/invocations", json=bad, timeout=30)
            assert answer.status_code == 400 and answer.json()["error_code"] == "INVALID_PARAMETER_VALUE", answer.text
    finally:
        stop(reference)
        log.close()
        service.stop()


def test_nan_in_a_feature_that_must_be_present_stays_an_error(client):
    body = '{"dataframe_split": {"columns": ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"], "data": [[5.1, 3.5, 1.4, NaN]]}}'
    answer = client.post("/invocations", data=body, content_type="application/json")
    assert answer.status_code == 400 and answer.json["error_code"] == "INVALID_PARAMETER_VALUE"
