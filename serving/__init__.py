"""The app factory: configuration, the registry, the active model, and the blueprints of the role."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, request

from serving import auth, requests
from serving.config import load_settings
from serving.errors import register_error_handlers
from serving.json_provider import OrjsonProvider
from serving.logs import configure_logging
from serving.model_store import ModelStore
from serving.registry import registry_from_config


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app for `APP_ROLE`: all (default), inference (never trains) or training.

    `test_config` overrides the environment (a dict of settings, checked like the environment);
    `START_MODEL_STORE=False` leaves the model unloaded, `WATCH_REGISTRY=False` skips the background
    watcher (tests drive it by hand). An invalid setting raises ConfigError before anything starts.
    """
    settings = load_settings(test_config)
    config = settings.model_dump()
    secrets = tuple(t.get_secret_value() for t in (settings.API_TOKEN, settings.PREDICT_TOKEN) if t is not None)
    configure_logging(config["LOG_FORMAT"], config["LOG_LEVEL"], secrets=secrets)
    app = Flask(__name__)
    app.config.update(config)
    app.extensions["settings"] = settings
    app.json = OrjsonProvider(app)
    registry = registry_from_config(config)
    app.extensions["registry"] = registry
    register_error_handlers(app)
    requests.init_app(app)
    auth.init_app(app, settings)

    @app.after_request
    def read_unread_body(response):
        """Read what the view left of the body (a 401, 405 or 415 answers before reading it).

        gunicorn (gthread) would drain it after answering, and a keep-alive client's next request, sent
        at once, can be swallowed by that drain: the client then waits 5 s (keepalive) for nothing.
        """
        if request.content_length and request.content_length <= app.config["MAX_CONTENT_LENGTH"]:
            request.stream.exhaust()
        return response

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

            def bootstrap():
                # Imported only here, when the registry is empty: the inference role never imports the
                # training package, and a start that serves a compiled version never imports scikit-learn.
                from training.bootstrap import bootstrap_default_model

                return bootstrap_default_model(registry, config["DEFAULT_MODEL_NAME"])

        store = ModelStore(
            registry, Path(config["STATE_DIR"]), config["ACTIVE_POLL_SECONDS"], bootstrap, config["SERVING_RUNTIME"]
        )
        app.extensions["model_store"] = store
        app.register_blueprint(inference.bp)
        if config["START_MODEL_STORE"]:
            store.start(watch=config["WATCH_REGISTRY"])

    if config["APP_ROLE"] in ("all", "training"):
        from training.blueprint import register_training

        register_training(app)
    return app
