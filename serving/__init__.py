"""The app factory: configuration, the registry, the active model, and the blueprints of the role."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from serving.config import load_config
from serving.errors import register_error_handlers
from serving.logs import configure_logging
from serving.model_store import ModelStore
from serving.registry import registry_from_config


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app for `APP_ROLE`: all (default), inference (never trains) or training.

    `test_config` overrides the environment; `START_MODEL_STORE=False` leaves the model unloaded,
    `WATCH_REGISTRY=False` skips the background watcher (tests drive it by hand).
    """
    config = load_config(test_config)
    configure_logging(config["LOG_FORMAT"], config["LOG_LEVEL"], secrets=(config["API_TOKEN"],))
    app = Flask(__name__)
    app.config.update(config)
    app.json.sort_keys = False
    registry = registry_from_config(config)
    app.extensions["registry"] = registry
    register_error_handlers(app)

    from serving import docs, logs, metrics

    logs.instrument(app)
    metrics.instrument(app)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(docs.bp)

    @app.get("/health")
    def health():
        """Liveness: 200 while the process runs."""
        return {"status": "ok", "role": config["APP_ROLE"]}

    if config["APP_ROLE"] in ("all", "inference"):
        from serving import inference

        bootstrap = None
        if config["APP_ROLE"] == "all" and config["BOOTSTRAP_DEFAULT_MODEL"]:
            # Imported only here: the inference role never imports the training package.
            from training.bootstrap import bootstrap_default_model

            def bootstrap():
                return bootstrap_default_model(registry, config["DEFAULT_MODEL_NAME"])

        store = ModelStore(registry, Path(config["STATE_DIR"]), config["ACTIVE_POLL_SECONDS"], bootstrap)
        app.extensions["model_store"] = store
        app.register_blueprint(inference.bp)
        if config.get("START_MODEL_STORE", True):
            store.start(watch=config["WATCH_REGISTRY"])

    if config["APP_ROLE"] in ("all", "training"):
        from training.blueprint import register_training

        register_training(app)
    return app
