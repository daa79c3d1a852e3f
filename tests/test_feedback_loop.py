"""The loop closed: labelled traffic (inputs recorded) retrains a model through POST /train, and a replay scores the
logged rows with another version offline (training/feedback_data.py, training/replay.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sklearn.metrics import accuracy_score

from kernel.registry import ModelRef
from service import create_app
from tests.conftest import client_of

NAME = "iris-loop"


@pytest.fixture(scope="module")
def served(store) -> ModelRef:
    """Version 1 of NAME, a LogisticRegression on iris: the version that answers the traffic."""
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    spec = TrainingSpec("LogisticRegression", {}, model_name=NAME, activate=False)
    return ModelRef(**run_training(store["registry"], spec, load_builtin("iris"))["model"])


@pytest.fixture
def loop_app(store, app_config, served, tmp_path):
    store["registry"].set_active_model(served)
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    app = create_app({**app_config, "PREDICTION_LOG_URL": url, "PREDICTION_LOG_FLUSH_SECONDS": 0.1,
                      "PREDICTION_LOG_INPUTS": True, "TRAIN_WARM_START": False})  # fmt: skip
    app.config["db_url"] = url
    yield app
    app.extensions["model_store"].stop()
    store["registry"].set_active_model(store["default"])


def traffic(client, count: int) -> tuple[list[dict], list[str], list[str], list[str]]:
    """Iris rows (a little noise) answered by the service: rows, their ids, what was served, their true class."""
    import numpy as np

    from training.datasets import load_builtin

    iris = load_builtin("iris")
    rng = np.random.default_rng(3)
    picked = rng.choice(len(iris.labels), count, replace=True)
    frame = (iris.features.iloc[picked] + rng.normal(0, 0.3, (count, 4))).round(2)
    rows = frame.to_dict(orient="records")
    ids, served = [], []
    for start in range(0, count, 25):
        answer = client.post("/predict", json={"records": rows[start : start + 25]}).get_json()
        ids += answer["prediction_ids"]
        served += answer["predictions"]
    return rows, ids, served, [str(label) for label in iris.labels.iloc[picked]]


def test_labelled_traffic_retrains_the_model_and_a_replay_says_how_the_candidate_would_have_done(
    loop_app, store, monkeypatch, capsys
):
    client = client_of(loop_app)
    body = {"estimator": "RandomForestClassifier", "params": {"n_estimators": 30}, "activate": False, "wait": True,
            "dataset": {"source": "feedback", "model": NAME, "include_training_data": True}}  # fmt: skip
    # Nothing labelled yet: a 400 that gives the count and the setting, and nothing is registered.
    refused = client.post("/train", json=body)
    assert refused.status_code == 400 and "0 labelled rows" in refused.get_json()["errors"]["dataset"][0]
    assert "PERFORMANCE_MIN_LABELS" in refused.get_json()["errors"]["dataset"][0]
    rows, ids, served, truth = traffic(client, 200)
    loop_app.extensions["prediction_log"].flush()
    feedback = [{"prediction_id": i, "label": t} for i, t in zip(ids[:150], truth[:150], strict=True)]
    assert client.post("/feedback", json={"feedback": feedback}).get_json()["accepted"] == 150

    # `since` as a span back from now: the rows of the last hour (all of them here), resolved to a time when accepted.
    trained = client.post("/train", json={**body, "dataset": {**body["dataset"], "since": "1h"}})
    assert trained.status_code == 201, trained.get_json()
    version = trained.get_json()["model"]
    assert version["name"] == NAME and version["version"] != "1"
    run = store["registry"].version_run(NAME, version["version"])
    params = run.data.params
    assert (params["dataset_source"], params["dataset_feedback_rows"], params["dataset_training_rows"]) == (
        "feedback", "150", "150")  # fmt: skip
    query = json.loads(params["dataset_query"])
    assert params["dataset_rows"] == "300" and query["model"] == NAME
    since = datetime.fromisoformat(query["since"])
    assert abs((datetime.now(UTC) - since).total_seconds() - 3600) < 300, query
    [logged] = run.inputs.dataset_inputs
    assert logged.dataset.name == f"feedback-{NAME}" and logged.dataset.digest == params["dataset_digest"]

    # Replay the logged rows with the new version, offline; the test computes the same from the service's answers.
    candidate = []
    for start in range(0, len(rows), 50):
        path = f"/models/{NAME}/versions/{version['version']}/predict"
        candidate += client.post(path, json={"records": rows[start : start + 50]}).get_json()["predictions"]
    for key, value in {"MLFLOW_TRACKING_URI": store["uri"], "PREDICTION_LOG_URL": loop_app.config["db_url"],
                       "STATE_DIR": loop_app.extensions["settings"].STATE_DIR}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    from training.__main__ import main

    assert main(["replay", "--model", NAME, "--candidate", version["version"], "--since", "1h"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 200 and printed["served_versions"] == {"1": 200} and printed["labelled_rows"] == 150
    assert printed["agreement"] == pytest.approx(sum(a == b for a, b in zip(served, candidate)) / 200, abs=1e-6)
    assert printed["accuracy"]["served"] == pytest.approx(accuracy_score(truth[:150], served[:150]), abs=1e-6)
    assert printed["accuracy"]["candidate"] == pytest.approx(accuracy_score(truth[:150], candidate[:150]), abs=1e-6)


@pytest.mark.parametrize(
    ("dataset", "field_text"),
    [
        ({"source": "feedback"}, "model"),
        ({"source": "elsewhere", "model": NAME}, "source"),
        ({"source": "feedback", "model": NAME, "since": "yesterday"}, "since"),
        ({"source": "feedback", "model": NAME, "since": 7}, "since"),
        ({"source": "feedback", "model": NAME, "bogus": 1}, "bogus"),
        ({"source": "feedback", "model": "no-such-model"}, "0 labelled rows"),
    ],
)  # fmt: skip
def test_bad_feedback_sources_are_400_and_register_nothing(loop_app, store, dataset, field_text):
    before = len(store["registry"].search_model_versions())
    answer = client_of(loop_app).post("/train", json={"estimator": "GaussianNB", "dataset": dataset, "wait": True})
    assert answer.status_code == 400 and answer.get_json()["error"] == "invalid_training_request"
    assert field_text in json.dumps(answer.get_json()["errors"])
    assert len(store["registry"].search_model_versions()) == before


def test_feedback_labels_come_back_as_the_type_of_the_models_classes():
    from training.datasets import DatasetError
    from training.feedback_data import typed_labels

    assert typed_labels(["0", "1", "1"], "long") == [0, 1, 1]
    assert typed_labels(["true", "False"], "boolean") == [True, False]
    assert typed_labels(["setosa"], "string") == ["setosa"]
    with pytest.raises(DatasetError, match="'yes' is not a long"):
        typed_labels(["1", "yes"], "long")
