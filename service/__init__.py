"""The composition root: the app factory, the only module that knows both halves (serving and training)."""

from __future__ import annotations

from flask import Flask, current_app, request

from kernel import auth, http, logs, metrics
from kernel.config import load_settings
from kernel.errors import register_error_handlers
from kernel.json_provider import OrjsonProvider
from kernel.logs import configure_logging
from kernel.registry import registry_from_settings


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app for `APP_ROLE`: all (default), inference (never trains) or training.

    `test_config` overrides the environment (a dict of settings, checked like the environment);
    `START_MODEL_STORE=False` leaves the model unloaded, `WATCH_REGISTRY=False` skips the background
    watcher (tests drive it by hand). An invalid setting raises ConfigError before anything starts.
    """
    settings = load_settings(test_config)
    tokens = (settings.API_TOKEN, settings.PREDICT_TOKEN, settings.FEEDBACK_TOKEN)
    secrets = tuple(t.get_secret_value() for t in tokens if t is not None)
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL, secrets=secrets)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_CONTENT_LENGTH  # Flask's own limit; the rest is `settings`
    app.extensions["settings"] = settings
    app.json = OrjsonProvider(app)
    registry = registry_from_settings(settings)
    app.extensions["registry"] = registry
    register_error_handlers(app)
    http.init_app(app)
    auth.init_app(app, settings)
    app.after_request(_read_unread_body)
    logs.instrument(app)
    metrics.instrument(app)
    app.register_blueprint(metrics.bp)

    from service import openapi

    app.register_blueprint(openapi.bp)

    @app.get("/health")
    def health():
        """Liveness: 200 while the process runs; the prediction log says if it is degraded, and why."""
        prediction_log = app.extensions.get("prediction_log")
        return {"status": "ok", "role": settings.APP_ROLE,
                **({"prediction_log": prediction_log.health()} if prediction_log is not None else {})}  # fmt: skip

    if settings.APP_ROLE in ("all", "inference"):
        import serving

        serving.init_app(app, settings, registry, bootstrap=_bootstrap(settings, registry))
    if settings.APP_ROLE in ("all", "training"):
        # Imported only for a role that trains: the inference role never imports the training package.
        import training

        training.init_app(app, settings, registry)
    return app


def _bootstrap(settings, registry):
    """The default model's training, for a first start with an empty registry (role `all` only), or None."""
    if settings.APP_ROLE != "all" or not settings.BOOTSTRAP_DEFAULT_MODEL:
        return None

    def bootstrap():
        # Imported only here, when the registry is empty: a start that serves a compiled version never
        # imports scikit-learn.
        from training.bootstrap import bootstrap_default_model

        return bootstrap_default_model(registry, settings.DEFAULT_MODEL_NAME)

    return bootstrap


def _read_unread_body(response):
    """Read what the view left of the body (a 401, 405 or 415 answers before reading it).

    gunicorn (gthread) would drain it after answering, and a keep-alive client's next request, sent
    at once, can be swallowed by that drain: the client then waits 5 s (keepalive) for nothing.
    """
    if request.content_length and request.content_length <= current_app.config["MAX_CONTENT_LENGTH"]:
        request.stream.exhaust()
    return response
