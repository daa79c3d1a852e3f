"""GET /openapi.json (the whole contract, importable into Postman) and GET /docs (Swagger UI)."""

from __future__ import annotations

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, request, send_from_directory

from kernel.auth import needs_token
from kernel.errors import ErrorSchema

bp = Blueprint("docs", __name__)

_JSON = "application/json"

# Success bodies of the root's own endpoints; each half adds its own (serving/api_doc.py, training's views).
RESPONSE_SCHEMAS = {
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "role": {"type": "string"},
            "prediction_log": {
                "type": "object",
                "description": "`ok`, `off`, `starting` or `degraded` (rows are dropped and counted), with the reason",
                "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["status"],
            },
        },
        "required": ["status"],
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


def _ok(description: str, schema) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


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


def build_spec(app) -> dict:
    """The OpenAPI 3 document of this app's endpoints (those of its role only), every answer declared.

    The root declares its own endpoints and the error shape; each half adds its paths and schemas
    through `app.extensions["openapi_extenders"]` (registered by its `init_app`).
    """
    spec = APISpec(
        title="Model serving for scikit-learn classifiers",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Train, list, choose and serve scikit-learn classifiers registered in MLflow."},
        components={"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    )
    spec.components.schema("Error", schema=ErrorSchema)
    for name, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(name, schema)
    spec.path("/health", operations={"get": {"summary": "Liveness", "responses": {"200": _ok("alive", "Health")}}})
    for extend in app.extensions.get("openapi_extenders", []):
        extend(spec)
    text = {"text/plain": {"schema": {"type": "string"}}}
    metrics = {
        "summary": "Prometheus metrics (text format)",
        "responses": {"200": {"description": "metrics", "content": text}},
    }
    spec.path("/metrics", operations={"get": metrics})
    document = _ok("the OpenAPI document", {"type": "object", "required": ["openapi", "paths"]})
    spec.path("/openapi.json", operations={"get": {"summary": "This document", "responses": {"200": document}}})
    return _complete(spec.to_dict(), app.extensions["auth"])


@bp.get("/openapi.json")
def openapi():
    spec = build_spec(current_app)
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
