"""Reading request bodies: the size limit for every transfer, JSON only, clear errors for the wrong type or text."""

from __future__ import annotations

import io
import json

import orjson
from flask import Flask, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from kernel.errors import APIError

_READ_SIZE = 64 * 1024
_OVER_LIMIT = "serving.body_over_limit"


def init_app(app: Flask) -> None:
    """Hold every chunked body to MAX_CONTENT_LENGTH, as Werkzeug holds one sent with Content-Length."""
    app.wsgi_app = ChunkedBodyLimit(app, app.wsgi_app)
    app.before_request(refuse_body_over_limit)


class ChunkedBodyLimit:
    """WSGI middleware: a chunked body is read here, up to one byte past the limit, before Flask sees it.

    Werkzeug refuses a Content-Length over the limit, but it cuts a chunked body (no Content-Length)
    at the limit without a word: the view would see a truncated body (400 malformed_json, or a
    shortened CSV). A body within the limit goes on with a Content-Length; one over it is dropped
    and marked, and `refuse_body_over_limit` answers 413 through the app's error handler.
    """

    def __init__(self, app: Flask, wsgi_app):
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            limit = self.app.config["MAX_CONTENT_LENGTH"]
            body = bytearray()
            while len(body) <= limit:
                chunk = environ["wsgi.input"].read(min(_READ_SIZE, limit + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
            if len(body) > limit:
                environ[_OVER_LIMIT] = True
                body = bytearray()
            environ["wsgi.input"] = io.BytesIO(bytes(body))
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]
        return self.wsgi_app(environ, start_response)


def refuse_body_over_limit() -> None:
    if request.environ.get(_OVER_LIMIT):
        raise RequestEntityTooLarge()


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
