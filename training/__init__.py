"""Training: client datasets, allow-listed estimators, jobs and their executors, and its blueprint."""

from __future__ import annotations

from flask import Flask

from kernel.config import Settings
from kernel.registry import Registry


def init_app(app: Flask, settings: Settings, registry: Registry) -> None:
    """Register the training blueprint, this machine's job executor and this half's OpenAPI paths."""
    from training import api_doc
    from training.views import register_training

    register_training(app, settings, registry)
    app.extensions.setdefault("openapi_extenders", []).append(api_doc.document)
