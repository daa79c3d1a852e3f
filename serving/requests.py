"""Reading request bodies: JSON only, with clear errors for the wrong type or malformed text."""

from __future__ import annotations

import json

import orjson
from flask import request
from marshmallow import Schema, ValidationError

from serving.errors import APIError


def json_body(example: dict | None = None):
    """The parsed JSON body; 415 if it is not sent as JSON, 400 if it does not parse."""
    details = {"example": example} if example is not None else {}
    if not request.is_json:
        raise APIError(
            415,
            "unsupported_media_type",
            "Send the body as JSON with the header Content-Type: application/json.",
            **details,
        )
    data = request.get_data()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass  # not strict JSON: Python's parser reads NaN and huge integers, so validation can name the field
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise APIError(400, "malformed_json", f"The body is not valid JSON: {exc}.", **details) from exc


def load_body(schema: Schema, example: dict | None = None) -> dict:
    """The JSON body validated by a marshmallow schema; 400 with `errors` if it does not fit."""
    body = json_body(example)
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", "The body must be a JSON object.", errors={"body": ["Not an object."]})
    try:
        return schema.load(body)
    except ValidationError as exc:
        raise APIError(400, "invalid_request", "The request body is not valid.", errors=exc.messages) from exc
