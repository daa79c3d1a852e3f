"""GET /models and POST /use-model: list every version, switch, and keep serving on a failed switch."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import DEFAULT_NAME, IRIS_ROW, ref

WINE_ROW_KEYS = {"alcohol", "malic_acid", "proline"}


def test_models_lists_every_version(client, store, wine_tree):
    models = client.get("/models").json["models"]
    by_ref = {(m["name"], m["version"]): m for m in models}
    default = by_ref[(DEFAULT_NAME, store["default"].version)]
    assert default["active"] is True
    assert "active" in default["aliases"]
    assert default["estimator"] == "RandomForestClassifier"
    assert default["dataset"] == "iris"
    assert 0.8 < default["metrics"]["accuracy"] <= 1.0
    assert default["run_id"]
    datetime.fromisoformat(default["created_at"].replace("Z", "+00:00"))
    wine = by_ref[(wine_tree.name, wine_tree.version)]
    assert wine["active"] is False
    assert wine["dataset"] == "wine"
    assert sum(m["active"] for m in models) == 1


def test_use_model_switches_and_predict_follows(client, store, wine_tree):
    response = client.post("/use-model", json={"name": wine_tree.name, "version": int(wine_tree.version)})
    assert response.status_code == 200, response.json
    assert ref(response.json["model"]) == wine_tree.as_dict()
    assert WINE_ROW_KEYS <= set(response.json["features"])
    bad = client.post("/predict", json=IRIS_ROW)
    assert bad.status_code == 400
    example = bad.json["example"]
    assert WINE_ROW_KEYS <= set(example)
    answer = client.post("/predict", json=example)
    assert answer.status_code == 200
    assert ref(answer.json["model"]) == wine_tree.as_dict()
    assert answer.json["predictions"][0] in {"class_0", "class_1", "class_2"}
    assert store["registry"].get_active_model() == wine_tree
    assert ref(client.get("/ready").json["model"]) == wine_tree.as_dict()


def test_use_model_by_alias(client, store, wine_tree):
    store["registry"].client.set_registered_model_alias(wine_tree.name, "champion", wine_tree.version)
    response = client.post("/use-model", json={"name": wine_tree.name, "alias": "champion"})
    assert response.status_code == 200
    assert ref(response.json["model"]) == wine_tree.as_dict()


@pytest.mark.parametrize(
    "body",
    [
        {"name": DEFAULT_NAME, "version": "999"},
        {"name": "no-such-model", "version": 1},
        {"name": DEFAULT_NAME, "alias": "no-such-alias"},
    ],
)
def test_unknown_version_is_404_and_old_model_keeps_serving(client, store, body):
    response = client.post("/use-model", json=body)
    assert response.status_code == 404
    assert response.json["error"] == "model_not_found"
    assert ref(client.post("/predict", json=IRIS_ROW).json["model"]) == store["default"].as_dict()
    assert store["registry"].get_active_model() == store["default"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": DEFAULT_NAME},
        {"name": DEFAULT_NAME, "version": "1", "alias": "x"},
        {"name": DEFAULT_NAME, "version": "latest"},
        {"name": DEFAULT_NAME, "version": 0},
        {"name": DEFAULT_NAME, "version": True},
        {"name": DEFAULT_NAME, "version": "1", "path": "/tmp/model.pkl"},
        {"name": 5, "version": "1"},
    ],
)
def test_bad_use_model_request_is_400(client, body):
    response = client.post("/use-model", json=body)
    assert response.status_code == 400
    assert response.json["errors"]


def test_pickled_model_is_refused_and_old_model_keeps_serving(client, store):
    """A version stored with pickle could run code when loaded: the service will not load it."""
    import mlflow
    from sklearn.dummy import DummyClassifier

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    with mlflow.start_run(experiment_id=store["registry"].get_experiment_id()):
        info = mlflow.sklearn.log_model(
            DummyClassifier().fit([[0], [1]], ["a", "b"]), name="model", serialization_format="cloudpickle"
        )
    version = mlflow.register_model(info.model_uri, "pickled-model")
    response = client.post("/use-model", json={"name": "pickled-model", "version": version.version})
    assert response.status_code == 422
    assert "pickle" in response.json["message"]
    assert ref(client.post("/predict", json=IRIS_ROW).json["model"]) == store["default"].as_dict()
    assert store["registry"].get_active_model() == store["default"]


def test_token_required_when_configured(store, app_config):
    from service import create_app

    app = create_app({**app_config, "API_TOKEN": "s3cret"})
    client = app.test_client()
    body = {"name": DEFAULT_NAME, "version": store["default"].version}
    assert client.post("/use-model", json=body).status_code == 401
    wrong = client.post("/use-model", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json["error"] == "unauthorized"
    ok = client.post("/use-model", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.post("/predict", json=IRIS_ROW).status_code == 200  # predictions need no token
