"""The inference half's part of the OpenAPI document: /ready, /predict (and by URL), /models, /use-model, schemas.

The composition root assembles the document (service/openapi.py); each half adds its own paths. The
one-row body is the active model's, from its signature, with a real example row.
"""

from __future__ import annotations

from flask import current_app

from kernel.config import current_settings
from serving import schemas

_JSON = "application/json"
_MODEL_REF = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
    "required": ["name", "version"],
}
_ALIAS_STATUS = {
    "type": "object",
    "description": "The active alias as this machine last read it: `conflict` (on two models: `holders` names "
    "them) and `missing` keep the current version serving.",
    "properties": {
        "name": {"type": "string"},
        "status": {"type": "string", "enum": ["ok", "missing", "conflict"]},
        "holders": {"type": "array", "items": _MODEL_REF},
    },
    "required": ["name", "status", "holders"],
}
RESPONSE_SCHEMAS = {
    "Ready": {
        "type": "object",
        "properties": {"status": {"type": "string"}, "model": _MODEL_REF, "alias": _ALIAS_STATUS},
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
}


def _answer(description: str, schema) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def row_schema(model) -> dict:
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


def _predict_operation(model) -> dict:
    row = row_schema(model) if model else {"type": "object", "additionalProperties": True}
    batch = {"type": "object", "properties": {"records": {"type": "array", "items": row}}, "required": ["records"]}
    body = {"schema": {"oneOf": [row, batch]}, **({"example": model.example} if model else {})}
    return {
        "summary": "Predict class labels and probabilities",
        "description": 'One row as an object, many as {"records": [...]}; MLflow\'s '
        "dataframe_split, dataframe_records, instances and inputs bodies are accepted too.",
        "requestBody": {"required": True, "content": {_JSON: body}},
        "responses": {
            "200": _answer("predictions", "PredictResponse"),
            "400": _answer("bad input: `errors` says what, `example` is a row that works", "Error"),
            "503": _answer("no model loaded yet", "Error"),
        },
    }


_ROUTE_HEADERS = {
    "X-Model-Version": {"description": "the version that answered", "schema": {"type": "string"}},
    "X-Model-Route": {
        "description": "`active`, `version` or `alias`; during a rollout `stable`, `candidate` or "
        "`fallback` (the candidate failed: the stable version answered)",
        "schema": {"type": "string"},
    },
}
_NAME = {"name": "name", "in": "path", "required": True, "description": "a registered model's name",
         "schema": {"type": "string", "minLength": 1, "example": "iris-RandomForestClassifier"}}  # fmt: skip


def _by_url_operation(model, path_parameter: dict, summary: str) -> dict:
    """/predict's operation for a version named in the URL: 404 and 503 say why it cannot answer."""
    operation = _predict_operation(model)
    operation["responses"] = {
        **operation["responses"],
        "404": _answer("no such model, version or alias (`model_not_found`)", "Error"),
        "503": _answer("registered but not loadable (`model_not_loadable`, with the reason), or MLflow unreachable",
                       "Error"),
    }  # fmt: skip
    operation["responses"]["200"] = {**operation["responses"]["200"], "headers": _ROUTE_HEADERS}
    operation["description"] += (
        " The active model does not change. The body must fit that version's features. An MLflow client pointed "
        "at the same URL without `/predict` posts to `.../invocations`, which takes MLflow's bodies and CSV."
    )
    # The served version as the defaults: what Postman's importer fills in, so an imported request answers.
    name = {**_NAME, "schema": {**_NAME["schema"], **({"default": model.ref.name} if model else {})}}
    return {**operation, "summary": summary, "parameters": [name, path_parameter]}


def _document_by_url(spec, model) -> None:
    version = {"name": "version", "in": "path", "required": True, "description": "a registered version number",
               "schema": {"type": "string", "pattern": "^[0-9]{1,18}$", "example": "1",
                          **({"default": model.ref.version} if model else {})}}  # fmt: skip
    alias = {"name": "alias", "in": "path", "required": True, "description": "an MLflow alias of that model",
             "schema": {"type": "string", "minLength": 1, "example": "active", "default": current_settings().ACTIVE_ALIAS}}  # fmt: skip
    summary = "Predict with a given version (the active model does not change)"
    spec.path(
        "/models/{name}/versions/{version}/predict", operations={"post": _by_url_operation(model, version, summary)}
    )
    summary = "Predict with the version an alias points to (the active model does not change)"
    spec.path("/models/{name}/aliases/{alias}/predict", operations={"post": _by_url_operation(model, alias, summary)})


def document(spec) -> None:
    """Add the inference endpoints and their schemas to the app's OpenAPI document (an APISpec)."""
    for name in ("PredictResponse", "ModelList", "UseModelRequest"):
        spec.components.schema(name, schema=getattr(schemas, name))
    for name, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(name, schema)
    store = current_app.extensions.get("model_store")
    model = store.get() if store is not None else None
    ready = {"200": _answer("a model is loaded", "Ready"), "503": _answer("no model loaded yet", "Error")}
    spec.path("/ready", operations={"get": {"summary": "Readiness", "responses": ready}})
    predict = _predict_operation(model)
    predict["responses"]["200"] = {**predict["responses"]["200"], "headers": _ROUTE_HEADERS}
    spec.path("/predict", operations={"post": predict})
    _document_by_url(spec, model)
    models = {"200": _answer("versions", "ModelList"), "503": _answer("MLflow unreachable", "Error")}
    spec.path("/models", operations={"get": {"summary": "Every registered version", "responses": models}})
    example = {"name": "iris-RandomForestClassifier", "version": "1"}
    use_model = {
        "summary": "Serve another registered version (every worker and instance)",
        "requestBody": {"required": True, "content": {_JSON: {"schema": "UseModelRequest", "example": example}}},
        "responses": {
            "200": _answer("now serving", "UseModelResponse"),
            "404": _answer("no such version", "Error"),
            "409": _answer("a rollout runs (`rollout_running`): end it first", "Error"),
            "422": _answer("version cannot be loaded", "Error"),
            "503": _answer("MLflow unreachable, or this machine's state folder cannot be written", "Error"),
        },
    }
    spec.path("/use-model", operations={"post": use_model})
