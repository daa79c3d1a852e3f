"""GET /openapi.json (the whole contract, importable into Postman) and GET /docs (Swagger UI)."""

from __future__ import annotations

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, request, send_from_directory

from kernel.auth import needs_token
from serving import schemas

bp = Blueprint("docs", __name__)

_JSON = "application/json"

_MODEL_REF = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
    "required": ["name", "version"],
}
_METRICS = {"type": "object", "additionalProperties": {"type": "number"}}
# Success bodies that are not marshmallow schemas: plain JSON Schema, registered as components.
RESPONSE_SCHEMAS = {
    "Health": {
        "type": "object",
        "properties": {"status": {"type": "string"}, "role": {"type": "string"}},
        "required": ["status"],
    },
    "Ready": {
        "type": "object",
        "properties": {"status": {"type": "string"}, "model": _MODEL_REF},
        "required": ["status", "model"],
    },
    "UseModelResponse": {
        "type": "object",
        "properties": {
            "model": _MODEL_REF,
            "features": {"type": "array", "items": {"type": "string"}},
            "classes": {"type": "array"},
        },
        "required": ["model", "features", "classes"],
    },
    "TrainResult": {
        "type": "object",
        "properties": {
            "model": _MODEL_REF,
            "run_id": {"type": "string"},
            "metrics": _METRICS,
            "activated": {"type": "boolean"},
        },
        "required": ["model", "run_id", "metrics", "activated"],
    },
    "Job": {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
            "estimator": {"type": "string", "nullable": True},
            "params": {"type": "object", "nullable": True},
            "dataset": {"type": "string", "nullable": True},
            "created_at": {"type": "string", "nullable": True},
            "location": {"type": "string"},
            "waited_seconds": {"type": "number", "nullable": True, "description": "Time spent queued."},
            "attempt": {"type": "integer", "description": "Which attempt runs (or ran) the job; 2 after a lost one."},
            "worker": {"type": "string", "nullable": True, "description": "host:pid of the attempt's process."},
            "started_at": {"type": "string", "nullable": True},
            "finished_at": {"type": "string", "nullable": True},
            "elapsed_seconds": {"type": "number", "nullable": True},
            "phase": {
                "type": "string",
                "nullable": True,
                "enum": ["validating", "fitting", "evaluating", "converting", "registering", None],
                "description": "What a running job does now.",
            },
            "phase_elapsed_seconds": {"type": "number", "nullable": True},
            "heartbeat_age_seconds": {
                "type": "number",
                "nullable": True,
                "description": "Seconds since the running attempt was last heard from (it beats every 5 s); "
                "past 30 s it is lost, and its job runs again or fails.",
            },
            "lost_attempt": {"type": "string", "description": "What happened to an earlier attempt that was lost."},
            "result": {"$ref": "#/components/schemas/TrainResult"},
            "error": {"type": "string", "description": "Why the job failed (status failed only)."},
        },
        "required": ["job_id", "status", "location"],
    },
}

# Answers any operation can give, added to every operation that has what causes them.
_COMMON = {"405": "this path does not accept that method"}
_WITH_BODY = {
    "400": "bad request: `errors` says what, `example` is a body that works",
    "413": "body over the size limit (MAX_CONTENT_LENGTH), sent with Content-Length or chunked",
    "415": "body not sent as JSON",
}
_WITH_TOKEN = {"401": "token missing or wrong"}
_ERROR_CONTENT = {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}  # after to_dict(): no name lookup


def _error(description: str) -> dict:
    return {"description": description, "content": {_JSON: {"schema": "Error"}}}


def _ok(description: str, schema) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _body(schema, example=None) -> dict:
    content = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"required": True, "content": {_JSON: content}}


def _row_schema(model) -> dict:
    """The one-row body of the active model, from its signature, with its real example row."""
    types = {"number": "number", "text": "string", "boolean": "boolean"}
    properties = {f.name: {"type": types[f.kind], **({} if f.required else {"nullable": True})} for f in model.features}
    return {
        "type": "object",
        "properties": properties,
        "required": [f.name for f in model.features],
        "additionalProperties": False,
        "example": model.example,
        "default": model.example,  # what schema-driven importers (Postman) put in the body
    }


def _complete(document: dict, tokens) -> dict:
    """Declare the answers every operation shares: 405; 400/413/415 with a body; the token and its 401
    wherever these settings ask for one (the management endpoints unless API_AUTH=off; /predict and
    /invocations with PREDICT_TOKEN)."""
    for path, operations in document["paths"].items():
        for operation in operations.values():
            extra = dict(_COMMON)
            if "requestBody" in operation:
                extra.update(_WITH_BODY)
            if needs_token(path, tokens):
                operation["security"] = [{"bearer": []}]
                extra.update(_WITH_TOKEN)
            for status, description in extra.items():
                operation["responses"].setdefault(status, {"description": description, "content": _ERROR_CONTENT})
    return document


def build_spec(app, model=None) -> dict:
    """The OpenAPI 3 document of this app's endpoints (those of its role only), every answer declared."""
    spec = APISpec(
        title="Model serving for scikit-learn classifiers",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Train, list, choose and serve scikit-learn classifiers registered in MLflow."},
        components={"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    )
    for name in ("Error", "PredictResponse", "ModelList", "UseModelRequest"):
        spec.components.schema(name, schema=getattr(schemas, name))
    for name, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(name, schema)
    spec.path("/health", operations={"get": {"summary": "Liveness", "responses": {"200": _ok("alive", "Health")}}})
    rules = {rule.rule for rule in app.url_map.iter_rules()}
    if "/predict" in rules:
        row = _row_schema(model) if model else {"type": "object", "additionalProperties": True}
        batch = {"type": "object", "properties": {"records": {"type": "array", "items": row}}, "required": ["records"]}
        spec.path(
            "/ready",
            operations={
                "get": {
                    "summary": "Readiness",
                    "responses": {"200": _ok("a model is loaded", "Ready"), "503": _error("no model loaded yet")},
                }
            },
        )
        spec.path(
            "/predict",
            operations={
                "post": {
                    "summary": "Predict class labels and probabilities",
                    "description": 'One row as an object, many as {"records": [...]}; MLflow\'s '
                    "dataframe_split, dataframe_records, instances and inputs bodies are accepted too.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            _JSON: {"schema": {"oneOf": [row, batch]}, **({"example": model.example} if model else {})}
                        },
                    },
                    "responses": {
                        "200": _ok("predictions", "PredictResponse"),
                        "400": _error("bad input: `errors` says what, `example` is a row that works"),
                        "503": _error("no model loaded yet"),
                    },
                }
            },
        )
        spec.path(
            "/models",
            operations={
                "get": {
                    "summary": "Every registered version",
                    "responses": {"200": _ok("versions", "ModelList"), "503": _error("MLflow unreachable")},
                }
            },
        )
        spec.path(
            "/use-model",
            operations={
                "post": {
                    "summary": "Serve another registered version (every worker and instance)",
                    "requestBody": _body("UseModelRequest", {"name": "iris-RandomForestClassifier", "version": "1"}),
                    "responses": {
                        "200": _ok("now serving", "UseModelResponse"),
                        "404": _error("no such version"),
                        "422": _error("version cannot be loaded"),
                        "503": _error("MLflow unreachable, or this machine's state folder cannot be written"),
                    },
                }
            },
        )
    for extend in current_app.extensions.get("openapi_extenders", []):
        extend(spec)
    spec.path(
        "/metrics",
        operations={
            "get": {
                "summary": "Prometheus metrics (text format)",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
    )
    spec.path(
        "/openapi.json",
        operations={
            "get": {
                "summary": "This document",
                "responses": {"200": _ok("the OpenAPI document", {"type": "object", "required": ["openapi", "paths"]})},
            }
        },
    )
    return _complete(spec.to_dict(), current_app.extensions["auth"])


@bp.get("/openapi.json")
def openapi():
    store = current_app.extensions.get("model_store")
    spec = build_spec(current_app, store.get() if store else None)
    spec["servers"] = [{"url": request.url_root.rstrip("/")}]  # so Postman's Import -> Link knows where to send
    _examples_as_defaults(spec)
    return spec


def _examples_as_defaults(spec: dict) -> None:
    """Each request body's example also as its schema's default: importers that build bodies from the
    schema (Postman's default) then send the example, not "<number>" placeholders."""
    for operations in spec["paths"].values():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                if "example" in content and "$ref" in content["schema"]:
                    content["schema"] = {"allOf": [content["schema"]], "default": content["example"]}


_DOCS_PAGE = """<!DOCTYPE html>
<html><head><title>Model serving API</title><meta charset="utf-8">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""


@bp.get("/docs")
def docs_page():
    """Interactive docs (Swagger UI, served from the installed package: no CDN needed)."""
    return Response(_DOCS_PAGE, mimetype="text/html")


@bp.get("/docs/static/<path:filename>")
def docs_static(filename: str):
    from swagger_ui_bundle import swagger_ui_path

    return send_from_directory(swagger_ui_path, filename)
