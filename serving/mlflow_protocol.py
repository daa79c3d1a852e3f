"""MLflow's scoring protocol at the HTTP edge: CSV bodies, `params`, and MLflow's `error_code` on errors.

What `mlflow models serve` takes is turned into the bodies `predict` already knows before it is called,
so a client written for MLflow's scoring server works unchanged.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from kernel.errors import APIError
from kernel.http import json_body
from kernel.model_format import BATCH_KEYS
from serving.loaded_model import LoadedModel
from serving.prediction import BadInput, parse_rows

CSV_TYPE = "text/csv"
PARAMS_KEY = "params"
# MLflow's error codes (mlflow.protos.databricks_pb2): rows that do not fit the model's schema are
# INVALID_PARAMETER_VALUE there (schema enforcement); other errors by their status.
INPUT_ERROR_CODE = "INVALID_PARAMETER_VALUE"
ERROR_CODES = {400: "BAD_REQUEST", 404: "RESOURCE_DOES_NOT_EXIST", 413: "BAD_REQUEST", 415: "BAD_REQUEST",
               503: "TEMPORARILY_UNAVAILABLE"}  # fmt: skip

log = logging.getLogger(__name__)


def csv_rows(data: bytes, model: LoadedModel) -> list[dict]:
    """The rows of a CSV body with a header row, typed as JSON would be (text columns stay text)."""
    try:
        import pandas as pd
    except ImportError as exc:  # the compiled-only Lambda package has no pandas
        raise APIError(415, "unsupported_media_type", "This deployment reads JSON bodies only; send the rows as JSON.",
                       example=model.example, error_code=ERROR_CODES[415]) from exc  # fmt: skip
    text_columns = {feature.name: str for feature in model.features if feature.kind == "text"}
    try:
        frame = pd.read_csv(io.StringIO(data.decode("utf-8")), dtype=text_columns)
    except UnicodeDecodeError as exc:
        raise APIError(400, "malformed_csv", "The CSV body is not UTF-8 text.", example=model.example) from exc
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        message = f"The body is not a CSV table with a header row: {exc}."
        raise APIError(400, "malformed_csv", message, example=model.example) from exc
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def without_params(body):
    """The body without MLflow's `params` (beside a batch form), which a model without params ignores.

    MLflow's scoring server does the same for a model whose signature has no params schema, and these
    scikit-learn models have none.
    """
    if isinstance(body, dict) and PARAMS_KEY in body and any(key in body for key in BATCH_KEYS):
        body = dict(body)
        params = body.pop(PARAMS_KEY)
        if params is not None and not isinstance(params, dict):
            raise APIError(400, "invalid_input", "`params` must be an object.", errors={PARAMS_KEY: ["Not an object."]})
        if params:
            log.info("params ignored: the model takes none (names: %s)", sorted(params)[:20])
    return body


def missing_as_null(body, model: LoadedModel):
    """In a batch, NaN in a feature that may be missing is a missing value, as pandas and MLflow read it.

    MLflow's clients send a DataFrame's missing values as NaN. NaN stays an error in the one-row form,
    in a feature that must be present, and anywhere Infinity is sent.
    """
    if not isinstance(body, dict) or not any(key in body for key in BATCH_KEYS):
        return body
    optional = [feature.name for feature in model.features if not feature.required and feature.kind == "number"]
    if not optional:
        return body
    try:
        rows, _ = parse_rows(body, model.feature_names)
    except BadInput:
        return body  # `predict` says what is wrong
    changed = False
    for row in rows:
        for name in optional:
            value = row.get(name) if isinstance(row, dict) else None
            if isinstance(value, float) and math.isnan(value):
                row[name], changed = None, True
    return {"dataframe_records": rows} if changed else body


def scoring_body(model: LoadedModel):
    """The request body as `predict` takes it: JSON (with `params` set aside) or CSV with a header row."""
    if request.mimetype == CSV_TYPE:
        return {"dataframe_records": csv_rows(request.get_data(), model)}
    if not request.is_json:
        message = "Send the body as JSON (Content-Type: application/json) or as CSV with a header row (text/csv)."
        raise APIError(415, "unsupported_media_type", message, example=model.example)
    return missing_as_null(without_params(json_body(example=model.example)), model)


def with_error_codes(view):
    """On /invocations (and .../invocations by URL), errors carry MLflow's `error_code` ("BAD_REQUEST", ...) besides our `error`."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not request.path.endswith("/invocations"):
            return view(*args, **kwargs)
        try:
            return view(*args, **kwargs)
        except APIError as exc:
            code = INPUT_ERROR_CODE if exc.error == "invalid_input" else ERROR_CODES.get(exc.status, "INTERNAL_ERROR")
            exc.details.setdefault("error_code", code)
            raise
        except RequestEntityTooLarge as exc:
            limit = current_app.config["MAX_CONTENT_LENGTH"]
            message = f"The request body is over the size limit of {limit} bytes."
            raise APIError(413, "request_entity_too_large", message, error_code=ERROR_CODES[413]) from exc

    return wrapper


def csv_example(example: dict) -> str:
    """The model's example row as a CSV body with a header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(example)
    writer.writerow("" if value is None else value for value in example.values())
    return buffer.getvalue()


def document(spec) -> None:
    """/ping, /invocations and /version in the OpenAPI document, with the active model's example."""
    store = current_app.extensions.get("model_store")
    model = store.get() if store is not None else None
    example = model.example if model is not None else None
    columns = list(example) if example else []
    json_example = {"dataframe_split": {"columns": columns, "data": [list(example.values())]}} if example else None
    error = {"content": {"application/json": {"schema": "Error"}}}
    spec.path(
        "/ping",
        operations={"get": {"summary": "MLflow and SageMaker health check: 200 once a model is loaded",
                            "responses": {"200": {"description": "a model is loaded",
                                                  "content": {"application/json": {"schema": "Ready"}}},
                                          "503": {"description": "no model loaded yet", **error}}}},
    )  # fmt: skip
    spec.path(
        "/version",
        operations={"get": {"summary": "The MLflow version (as `mlflow models serve` answers it)",
                            "responses": {"200": {"description": "the version string"}}}},
    )  # fmt: skip
    batch = {
        "type": "object",
        "description": "One of dataframe_split, dataframe_records, instances or inputs; `params` is accepted "
        "and ignored (these models take none), as MLflow does.",
        "properties": {
            "dataframe_split": {"type": "object", "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                                                                  "data": {"type": "array", "items": {"type": "array", "items": {}}}}},
            "dataframe_records": {"type": "array", "items": {"type": "object"}},
            "instances": {"type": "array", "items": {}},
            "inputs": {},
            "params": {"type": "object"},
        },
        **({"example": json_example, "default": json_example} if json_example else {}),
    }  # fmt: skip
    content = {"application/json": {"schema": batch, **({"example": json_example} if json_example else {})},
               CSV_TYPE: {"schema": {"type": "string"}, **({"example": csv_example(example)} if example else {})}}  # fmt: skip
    spec.path(
        "/invocations",
        operations={
            "post": {
                "summary": "MLflow's scoring protocol (as `mlflow models serve`): JSON or CSV with a header row",
                "requestBody": {"required": True, "content": content},
                "responses": {
                    "200": {
                        "description": "predictions",
                        "content": {"application/json": {"schema": "PredictResponse"}},
                    },
                    "400": {"description": "bad input; `error_code` is MLflow's (BAD_REQUEST)", **error},
                    "413": {"description": "body over the size limit", **error},
                    "415": {"description": "neither JSON nor CSV", **error},
                    "503": {"description": "no model loaded yet", **error},
                },
            }
        },
    )
