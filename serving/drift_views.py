"""GET /drift, and the drift gauges `/metrics` computes at scrape, for the versions this instance serves."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, request
from marshmallow import Schema, ValidationError, fields, validate
from prometheus_client.core import GaugeMetricFamily

from kernel.config import current_settings
from kernel.errors import APIError

bp = Blueprint("drift", __name__)
log = logging.getLogger(__name__)
LEVELS = ("ok", "warn", "alert")


class DriftQuery(Schema):
    window = fields.Integer(strict=False, metadata={"description": "seconds (60 to DRIFT_WINDOW_SECONDS)"})
    name = fields.String(validate=validate.Length(min=1))
    version = fields.String(validate=validate.Length(min=1))


def served_models() -> list[tuple]:
    """(model, route) for each version this process serves: the active one (`stable`) and, while a rollout
    runs, its candidate (`candidate`; left out while it cannot be loaded: its requests fall back to stable)."""
    store = current_app.extensions["model_store"]
    model = store.get()
    if model is None:
        return []
    served = [(model, "stable")]
    spec = store.rollout
    if spec is not None and spec.stable == model.ref:
        try:
            candidate = current_app.extensions["versions"].by_version(spec.candidate.name, spec.candidate.version)
        except Exception:  # noqa: BLE001 - the candidate's failure shows in GET /rollout, not here
            log.warning("drift: rollout %s's candidate cannot be loaded", spec.id)
        else:
            served.append((candidate, "candidate"))
    return served


def drift_report(window: int | None, name: str | None = None, version: str | None = None) -> dict:
    settings = current_settings()
    window = settings.DRIFT_WINDOW_SECONDS if window is None else window
    monitor = current_app.extensions["drift"]
    models = served_models()
    if name is not None or version is not None:
        models = [(m, r) for m, r in models if name in (None, m.ref.name) and version in (None, m.ref.version)]
        if not models:
            raise APIError(404, "not_served", "Drift is counted for the active version and a rollout's candidate "
                           f"only; {name or ''} version {version or '?'} is not served here. GET /ready names it.")  # fmt: skip
    return {"window_seconds": window, "scope": monitor.scope, "enabled": monitor.enabled,
            "models": [monitor.version_report(model, window, route) for model, route in models]}  # fmt: skip


@bp.get("/drift")
def drift():
    """Whether the served inputs and predicted classes still look like the version's training rows."""
    try:
        query = DriftQuery().load(request.args.to_dict())
    except ValidationError as exc:
        raise APIError(400, "invalid_input", "The query parameters are not valid.", errors=exc.messages) from exc
    window = query.get("window")
    limit = current_settings().DRIFT_WINDOW_SECONDS
    if window is not None and not 60 <= window <= limit:
        raise APIError(400, "invalid_input", "The query parameters are not valid.",
                       errors={"window": [f"seconds from 60 to {limit} (DRIFT_WINDOW_SECONDS)"]})  # fmt: skip
    return drift_report(window, query.get("name"), query.get("version"))


class DriftCollector:
    """model_feature_psi, model_feature_js, model_prediction_psi, model_drift_rows and model_drift_features."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        labels = ["model", "version"]
        psi = GaugeMetricFamily("model_feature_psi", "PSI of a feature against the version's baseline",
                                labels=[*labels, "feature"])  # fmt: skip
        js = GaugeMetricFamily("model_feature_js", "Jensen-Shannon distance of a feature against the baseline",
                               labels=[*labels, "feature"])  # fmt: skip
        prediction = GaugeMetricFamily("model_prediction_psi", "PSI of the predicted classes against the baseline",
                                       labels=labels)  # fmt: skip
        rows = GaugeMetricFamily("model_drift_rows", "Rows counted for drift in the window", labels=labels)
        levels = GaugeMetricFamily("model_drift_features", "Features at each drift level", labels=[*labels, "level"])
        with self.app.app_context():
            report = drift_report(None)
        for entry in report["models"]:
            key = [entry["name"], entry["version"]]
            rows.add_metric(key, entry["rows"])
            if "prediction" not in entry:
                continue
            prediction.add_metric(key, entry["prediction"]["psi"])
            for feature in entry["features"]:
                psi.add_metric([*key, feature["name"]], feature["psi"])
                js.add_metric([*key, feature["name"]], feature["js"])
            for level in LEVELS:
                levels.add_metric([*key, level], sum(f["level"] == level for f in entry["features"]))
        yield from (psi, js, prediction, rows, levels)


DRIFT_SCHEMA = {
    "type": "object",
    "properties": {
        "window_seconds": {"type": "integer"},
        "scope": {"type": "string", "enum": ["instance", "process"]},
        "enabled": {"type": "boolean"},
        "models": {"type": "array", "items": {"type": "object", "required": ["name", "version", "rows", "status"]}},
    },
    "required": ["window_seconds", "scope", "models"],
}


def document(spec) -> None:
    """Add GET /drift to the app's OpenAPI document."""
    spec.components.schema("Drift", DRIFT_SCHEMA)
    limit = current_settings().DRIFT_WINDOW_SECONDS
    window = {"name": "window", "in": "query", "required": False,
              "example": limit, "schema": {"type": "integer", "minimum": 60, "maximum": limit, "default": limit}}  # fmt: skip
    served = served_models()
    examples = {"name": served[0][0].ref.name, "version": served[0][0].ref.version} if served else {}
    # Without them, every served version. The active version as the schema's default: what Postman fills in.
    names = [{"name": key, "in": "query", "required": False,
              "schema": {"type": "string", "minLength": 1, **({"default": examples[key]} if examples else {})}}
             for key in ("name", "version")]  # fmt: skip
    json = "application/json"
    responses = {
        "200": {"description": "distances per served version", "content": {json: {"schema": "Drift"}}},
        "400": {"description": "a bad window or an unknown parameter", "content": {json: {"schema": "Error"}}},
        "404": {"description": "that version is not served here", "content": {json: {"schema": "Error"}}},
    }
    operation = {"summary": "Input and prediction drift against the served versions' baselines",
                 "parameters": [window, *names], "responses": responses}  # fmt: skip
    spec.path("/drift", operations={"get": operation})
