"""GET /openapi.json (the whole contract, importable into Postman) and GET /docs (Swagger UI)."""

from __future__ import annotations

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, request, send_from_directory

from serving import schemas

bp = Blueprint("docs", __name__)

_JSON = "application/json"


def _error(description: str) -> dict:
    return {"description": description, "content": {_JSON: {"schema": "Error"}}}


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


def build_spec(app, model=None) -> dict:
    """The OpenAPI 3 document of this app's endpoints (those of its role only)."""
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
    spec.path("/health", operations={"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}})
    rules = {rule.rule for rule in app.url_map.iter_rules()}
    if "/predict" in rules:
        row = _row_schema(model) if model else {"type": "object", "additionalProperties": True}
        batch = {"type": "object", "properties": {"records": {"type": "array", "items": row}}, "required": ["records"]}
        spec.path(
            "/ready",
            operations={
                "get": {
                    "summary": "Readiness",
                    "responses": {"200": {"description": "a model is loaded"}, "503": _error("no model loaded yet")},
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
                        "200": {"description": "predictions", "content": {_JSON: {"schema": "PredictResponse"}}},
                        "400": _error("bad input: `errors` says what, `example` is a row that works"),
                        "413": _error("body over the size limit"),
                        "415": _error("body not sent as JSON"),
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
                    "responses": {
                        "200": {"description": "versions", "content": {_JSON: {"schema": "ModelList"}}},
                        "503": _error("MLflow unreachable"),
                    },
                }
            },
        )
        spec.path(
            "/use-model",
            operations={
                "post": {
                    "summary": "Serve another registered version (every worker and instance)",
                    "security": [{"bearer": []}],
                    "requestBody": _body("UseModelRequest", {"name": "iris-RandomForestClassifier", "version": "1"}),
                    "responses": {
                        "200": {"description": "now serving"},
                        "400": _error("bad request"),
                        "401": _error("token missing or wrong"),
                        "404": _error("no such version"),
                        "422": _error("version cannot be loaded"),
                        "503": _error("MLflow unreachable"),
                    },
                }
            },
        )
    for extend in current_app.extensions.get("openapi_extenders", []):
        extend(spec)
    spec.path(
        "/metrics",
        operations={
            "get": {"summary": "Prometheus metrics (text format)", "responses": {"200": {"description": "metrics"}}}
        },
    )
    return spec.to_dict()


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
