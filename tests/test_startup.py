"""Start-up: bootstrap on an empty registry, readiness, restarts, and a tracking server that is down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service import create_app
from tests.conftest import DEFAULT_NAME, IRIS_ROW, ROOT, TOKEN, client_of, ref


def test_not_ready_before_a_model_is_loaded(app_config):
    app = create_app({**app_config, "START_MODEL_STORE": False})
    client = app.test_client()
    assert client.get("/health").status_code == 200
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json["error"] == "not_ready"
    assert client.post("/predict", json=IRIS_ROW).status_code == 503


def test_bootstrap_registers_exactly_one_default_version(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = create_app({"MLFLOW_TRACKING_URI": uri, "WATCH_REGISTRY": False})
    registry = first.extensions["registry"]
    assert registry.get_active_model().name == DEFAULT_NAME
    second = create_app({"MLFLOW_TRACKING_URI": uri, "WATCH_REGISTRY": False})  # a restart
    assert [m["version"] for m in registry.list_models()] == ["1"]
    assert second.test_client().post("/predict", json=IRIS_ROW).json["predictions"] == ["setosa"]
    # The artifacts live beside the database, so the folder is a complete store.
    assert (tmp_path / "artifacts").is_dir()
    assert (tmp_path / "serving-state" / "active.json").is_file()


def test_restart_serves_the_last_chosen_version(store, app_config, wine_tree):
    app = create_app(app_config)
    response = client_of(app).post("/use-model", json=wine_tree.as_dict())
    assert response.status_code == 200, response.json
    restarted = create_app(app_config)
    assert ref(restarted.test_client().get("/ready").json["model"]) == wine_tree.as_dict()
    store["registry"].set_active_model(store["default"])


def test_inference_role_does_not_bootstrap(tmp_path):
    app = create_app({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "APP_ROLE": "inference",
                      "WATCH_REGISTRY": False})  # fmt: skip
    client = app.test_client()
    assert client.get("/ready").status_code == 503
    assert client.get("/models").json == {"models": []}


def test_unreachable_registry_at_start_serves_this_machines_last_model(store, app_config):
    create_app(app_config)  # fills this machine's cache and pointer
    down = {**app_config, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0,
            "MLFLOW_HTTP_REQUEST_TIMEOUT": 1}  # fmt: skip
    app = create_app(down)
    client = app.test_client()
    assert ref(client.post("/predict", json=IRIS_ROW).json["model"]) == store["default"].as_dict()
    models = client.get("/models")
    assert models.status_code == 503
    assert models.json["error"] == "registry_unavailable"


def test_bad_tracking_uri_fails_fast():
    with pytest.raises(ValueError, match="unsupported scheme"):
        create_app({"MLFLOW_TRACKING_URI": "ftp://example/mlflow"})


def test_a_start_serving_a_compiled_version_does_not_import_scikit_learn(store, app_config):
    """scikit-learn (with skops) was most of a start's time: the app with training enabled, serving a
    compiled version, answers without it; the first /train brings it in."""
    store["registry"].set_active_model(store["default"])
    script = f"""
import json, sys
from service import create_app
app = create_app({app_config!r})
client = app.test_client()
predicted = client.post("/predict", json={IRIS_ROW!r})
before = "sklearn" in sys.modules
listed = client.get("/openapi.json").status_code
refused = client.post("/train", json={{"estimator": "NoSuchEstimator"}}, headers={{"Authorization": "Bearer {TOKEN}"}})
print(json.dumps([predicted.status_code, predicted.json["model"]["runtime"], before, listed, refused.status_code,
                  "sklearn" in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [200, "onnx", False, 200, 400, True]
