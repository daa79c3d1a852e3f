"""A tracking server that goes away: predictions go on from memory, management says 503, all recovers."""

from __future__ import annotations

import time

from kernel.registry import ModelRef
from service import create_app
from tests.conftest import IRIS_ROW, TOKEN, client_of, ref, stop
from tests.servers import start_mlflow_server


def test_predict_serves_through_an_outage_and_everything_recovers(tmp_path):
    process, uri, log = start_mlflow_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri(), tmp_path
    )
    port = uri.rsplit(":", 1)[1]
    config = {"MLFLOW_TRACKING_URI": uri, "STATE_DIR": str(tmp_path / "state"), "ACTIVE_POLL_SECONDS": 0.5,
              "MLFLOW_HTTP_REQUEST_TIMEOUT": 2, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 1, "API_TOKEN": TOKEN}  # fmt: skip
    app = create_app(config)
    client = client_of(app)
    store = app.extensions["model_store"]
    try:
        default = ref(client.post("/predict", json=IRIS_ROW).json["model"])
        stop(process)
        log.close()

        assert ref(client.post("/predict", json=IRIS_ROW).json["model"]) == default
        started = time.monotonic()
        models = client.get("/models")
        elapsed = time.monotonic() - started
        assert models.status_code == 503
        assert models.json["error"] == "registry_unavailable"
        assert "predictions still work" in models.json["message"]
        # At most one MLflow call's budget as configured above: 2 attempts of at most 2 s, and a backoff of at most
        # 1.5 s between them (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 1, jitter 0.5). Not gunicorn's 120 s.
        budget = (1 + config["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) * config["MLFLOW_HTTP_REQUEST_TIMEOUT"] + 1.5
        assert elapsed < budget, f"/models took {elapsed:.1f}s with the server down; one call's budget is {budget} s"
        assert client.post("/use-model", json=default).status_code == 503
        time.sleep(1.5)  # the watcher fails a few polls meanwhile, and the model stays
        assert ref(client.post("/predict", json=IRIS_ROW).json["model"]) == default
        assert store.registry_available is False

        process, _, log = start_mlflow_server(
            f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri(), tmp_path, port=int(port)
        )
        deadline = time.monotonic() + 30
        while client.get("/models").status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.5)
        assert client.post("/use-model", json=default).status_code == 200
    finally:
        store.stop()
        stop(process)
        log.close()


def test_a_version_that_fails_to_load_is_not_retried_in_a_loop(store, app_config):
    """The registry names a version this service refuses (pickled): the old model serves, one attempt."""
    import mlflow
    from sklearn.dummy import DummyClassifier

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    with mlflow.start_run(experiment_id=store["registry"].get_experiment_id()):
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], ["a", "b"]), name="model",
                                        serialization_format="cloudpickle")  # fmt: skip
    version = mlflow.register_model(info.model_uri, "pickled-elsewhere")
    store["registry"].set_active_model(store["default"])
    app = create_app(app_config)
    model_store = app.extensions["model_store"]
    attempts = []
    original = model_store.cache.load
    model_store.cache.load = lambda ref, download: attempts.append(ref) or original(ref, download)
    try:
        store["registry"].set_active_model(ModelRef("pickled-elsewhere", version.version))
        for _ in range(5):
            model_store.follow_registry()
        assert len(attempts) == 1
        assert "pickle" in model_store.last_error
        assert ref(app.test_client().post("/predict", json=IRIS_ROW).json["model"]) == store["default"].as_dict()
    finally:
        store["registry"].set_active_model(store["default"])


def test_a_deleted_active_version_does_not_stop_new_workers(tmp_path):
    """Someone deletes the active version in the MLflow UI: a new worker still starts, not ready, and says why.

    MLflow removes the alias with the version: the alias is missing, and the registry is not empty, so the
    default model is not trained again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = create_app({"MLFLOW_TRACKING_URI": uri, "WATCH_REGISTRY": False})
    registry = first.extensions["registry"]
    active = registry.get_active_model()
    registry.delete_model_version(active)
    fresh = create_app(
        {"MLFLOW_TRACKING_URI": uri, "STATE_DIR": str(tmp_path / "other-machine"), "WATCH_REGISTRY": False}
    )
    ready = fresh.test_client().get("/ready")
    assert ready.status_code == 503
    assert "alias 'active' is missing" in ready.json["message"]
    assert registry.search_model_versions() == []  # nothing bootstrapped
