"""Inference: the active model of this process, prediction as plain functions, and its blueprint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from kernel.config import Settings
from kernel.registry import ModelRef, Registry


def init_app(
    app: Flask, settings: Settings, registry: Registry, bootstrap: Callable[[], ModelRef] | None = None
) -> None:
    """Register the inference blueprint and this process's model store (loaded now unless START_MODEL_STORE is off).

    `bootstrap` trains the default model when the registry is empty (the composition root passes it
    for the `all` role). The store's `catch_up` is offered to the other half as `app.extensions["catch_up"]`.
    """
    from serving import api_doc, drift_views, feedback_views, rollout_views, views
    from serving.drift import DriftMonitor
    from serving.live_performance import LivePerformanceCollector
    from serving.model_store import ModelStore
    from serving.prediction_log import PredictionLog
    from serving.rollout_owner import RolloutOwner
    from serving.routing import new_shadow
    from serving.versions import Versions

    store = ModelStore(
        registry,
        Path(settings.STATE_DIR),
        settings.ACTIVE_POLL_SECONDS,
        bootstrap,
        settings.SERVING_RUNTIME,
        settings.SERVING_CACHE_VERSIONS,
    )
    app.extensions["model_store"] = store
    on_lambda = bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))  # one process, frozen between answers
    if not on_lambda:  # Lambda routes and counts a rollout; container instances report and decide
        owner = RolloutOwner(registry, Path(settings.STATE_DIR), settings.ROLLOUT_REPORT_SECONDS,
                             settings.ROLLOUT_LEASE_SECONDS)  # fmt: skip
        store.poll_hooks.append(owner.tick)
    app.extensions["versions"] = Versions(store, settings.ACTIVE_POLL_SECONDS)
    app.extensions["catch_up"] = store.catch_up
    app.extensions["drift"] = DriftMonitor(settings)
    app.extensions["prediction_log"] = prediction_log = PredictionLog(settings)
    prediction_log.start(settings)
    prediction_log.holdout_of = registry.get_version_metrics
    prediction_log.log_live = registry.log_live_metrics
    app.extensions.setdefault("metrics_collectors", []).append(
        LivePerformanceCollector(
            Path(settings.STATE_DIR), settings.PERFORMANCE_ALERT_DROP, settings.PERFORMANCE_MIN_LABELS
        )
    )
    app.extensions.setdefault("exit_hooks", []).append(prediction_log.flush)  # gunicorn's worker_exit skips atexit
    app.extensions["shadow"] = new_shadow(
        lambda spec: app.extensions["versions"].by_version(spec.candidate.name, spec.candidate.version),
        settings.SHADOW_QUEUE, settings.SHADOW_MAX_ROWS, app.extensions["drift"].observe,
        inline=on_lambda,  # frozen between answers: no thread would run
        inline_budget_ms=settings.SHADOW_INLINE_BUDGET_MS, inline_sample=settings.SHADOW_INLINE_SAMPLE,
    )  # fmt: skip
    app.extensions.setdefault("metrics_collectors", []).append(drift_views.DriftCollector(app))
    app.extensions.setdefault("openapi_extenders", []).extend(
        [api_doc.document, drift_views.document, rollout_views.document, feedback_views.document]
    )
    app.register_blueprint(views.bp)
    app.register_blueprint(drift_views.bp)
    app.register_blueprint(rollout_views.bp)
    app.register_blueprint(feedback_views.bp)
    if settings.START_MODEL_STORE:
        store.start(watch=settings.WATCH_REGISTRY)
