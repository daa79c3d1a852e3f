"""The feedback blueprint: POST /feedback (labels for logged predictions) and a version's live performance. Thin.

SQLAlchemy is imported when these are used, not when the app starts: the compiled-only stack has none.
"""

from __future__ import annotations

import csv
import io

from flask import Blueprint, current_app, request

from kernel.auth import require_token
from kernel.config import current_settings
from kernel.errors import APIError
from kernel.http import load_body
from kernel.registry import ModelNotFound

bp = Blueprint("feedback", __name__)
EXAMPLE = {"feedback": [{"prediction_id": "3f9c0a1b2c3d4e5f0", "label": "setosa"}]}


def _engine():
    log = current_app.extensions["prediction_log"]
    if not log.enabled:
        raise APIError(409, "prediction_log_off", "The prediction log is off (PREDICTION_LOG=off): nothing to label.")
    return log.database()


def _classes(name: str, version: str) -> list[str]:
    return current_app.extensions["versions"].by_version(name, version).class_keys


def _csv_items() -> dict:
    """A `prediction_id,label` CSV body (a header row first), as the JSON body's shape."""
    text = request.get_data().decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or {"prediction_id", "label"} - set(reader.fieldnames):
        raise APIError(400, "invalid_request", "A CSV body needs a header row: prediction_id,label.", example=EXAMPLE)
    return {"feedback": [{"prediction_id": row["prediction_id"], "label": row["label"]} for row in reader]}


@bp.post("/feedback")
@require_token
def feedback():
    """Labels for logged predictions: per-item results (accepted, updated, unknown ids, invalid with the reason)."""
    from serving.feedback import apply_feedback, feedback_schema

    schema = feedback_schema(current_settings().FEEDBACK_MAX_ITEMS)
    if request.mimetype == "text/csv":
        body = _csv_items()
        errors = schema.validate(body)
        if errors:
            raise APIError(400, "invalid_request", "The CSV body is not valid.", errors=errors, example=EXAMPLE)
        items = schema.load(body)
    else:
        items = load_body(schema, example=EXAMPLE)
    return apply_feedback(_engine(), items["feedback"], _classes)


@bp.get("/models/<name>/versions/<version>/performance")
def version_performance(name: str, version: str):
    """Live accuracy of a version over `window` (default 7d), beside its hold-out metrics from training."""
    from serving.feedback import parse_window, performance

    unknown = set(request.args) - {"window"}
    if unknown:
        raise APIError(400, "invalid_request", f"Unknown query parameter: {', '.join(sorted(unknown))}.")
    try:
        seconds = parse_window(request.args.get("window", "7d"), current_settings().PREDICTION_LOG_RETENTION_DAYS)
    except ValueError as exc:
        raise APIError(400, "invalid_request", f"window: {exc}") from exc
    registry = current_app.extensions["registry"]
    try:
        holdout = registry.get_version_metrics(name, version)
    except ModelNotFound as exc:
        raise APIError(404, "model_not_found", f"No registered model {name!r} with version {version}.") from exc
    classes = _classes(name, version)
    answer = performance(_engine(), name, version, seconds, classes, current_settings().PERFORMANCE_MIN_LABELS)
    return {**answer, "holdout": holdout}


_JSON = "application/json"


def _answer(description: str, schema) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def document(spec) -> None:
    """Add POST /feedback and a version's /performance to the app's OpenAPI document."""
    item = {"type": "object", "additionalProperties": False, "required": ["prediction_id", "label"],
            "properties": {"prediction_id": {"type": "string", "minLength": 1, "maxLength": 40},
                           "label": {"oneOf": [{"type": "string", "minLength": 1}, {"type": "number"}]}}}  # fmt: skip
    body = {"type": "object", "additionalProperties": False, "required": ["feedback"],
            "properties": {"feedback": {"type": "array", "minItems": 1, "items": item,
                                        "maxItems": current_settings().FEEDBACK_MAX_ITEMS}}}  # fmt: skip
    results = {"type": "object", "required": ["accepted", "updated", "unknown_ids", "invalid"],
               "properties": {"accepted": {"type": "integer"}, "updated": {"type": "integer"},
                              "unknown_ids": {"type": "array", "items": {"type": "string"}},
                              "invalid": {"type": "array", "items": {"type": "object"}}}}  # fmt: skip
    csv_body = {"schema": {"type": "string"}, "example": "prediction_id,label\n3f9c0a1b2c3d4e5f0,setosa\n"}
    operation = {
        "summary": "Ground truth for logged predictions, by id (JSON, or CSV: prediction_id,label)",
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": body, "example": EXAMPLE}, "text/csv": csv_body},
        },
        "responses": {
            "200": _answer("per-item results", results),
            "409": _answer("the prediction log is off", "Error"),
            "404": _answer("a labelled prediction's version is no longer registered", "Error"),
            "503": _answer("MLflow unreachable, or that version cannot be loaded", "Error"),
        },
    }
    spec.path("/feedback", operations={"post": operation})
    window = {"name": "window", "in": "query", "required": False, "description": "7d, 12h or 900s: 1h to PREDICTION_LOG_RETENTION_DAYS",
              "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,6}[smhd]$", "default": "7d"}}  # fmt: skip
    model = current_app.extensions["model_store"].get()  # the served version as defaults: what Postman fills in
    defaults = ({"default": model.ref.name}, {"default": model.ref.version}) if model else ({}, {})
    path = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, **defaults[0]}},
            {"name": "version", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[0-9]{1,18}$", **defaults[1]}}]  # fmt: skip
    performance = {
        "summary": "Live accuracy of a version from the labels that came back, beside its hold-out metrics",
        "parameters": [*path, window],
        "responses": {
            "200": _answer("figures, or `insufficient_labels` with the counts", {"type": "object"}),
            "400": _answer("a bad window", "Error"),
            "404": _answer("no such version", "Error"),
            "409": _answer("the prediction log is off", "Error"),
            "503": _answer("MLflow unreachable, or that version cannot be loaded", "Error"),
        },
    }
    spec.path("/models/{name}/versions/{version}/performance", operations={"get": performance})
