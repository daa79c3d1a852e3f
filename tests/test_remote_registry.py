"""The registry module against a real `mlflow server` over HTTP, unchanged."""

from __future__ import annotations

from service import create_app
from tests.conftest import DEFAULT_NAME, IRIS_ROW, TOKEN, client_of


def test_service_against_mlflow_server(mlflow_server, tmp_path):
    config = {
        "MLFLOW_TRACKING_URI": mlflow_server["uri"],
        "STATE_DIR": str(tmp_path / "state"),
        "WATCH_REGISTRY": False,
        "API_TOKEN": TOKEN,
    }
    app = create_app(config)
    client = client_of(app)
    answer = client.post("/predict", json=IRIS_ROW)
    assert answer.status_code == 200
    assert answer.json["model"]["name"] == DEFAULT_NAME
    models = client.get("/models").json["models"]
    assert [(m["name"], m["active"]) for m in models] == [(DEFAULT_NAME, True)]
    assert client.post("/use-model", json={"name": DEFAULT_NAME, "alias": "active"}).status_code == 200
    assert client.post("/use-model", json={"name": DEFAULT_NAME, "version": "2"}).status_code == 404
    # The artifacts went to the server's artifact store, not to a local folder of ours.
    assert any((mlflow_server["folder"] / "artifacts").rglob("model.skops"))
