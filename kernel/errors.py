"""Every error is JSON of one shape: {"error": code, "message": sentence, ...details}, from one handler.

A domain error (the registry unreachable, a job not found, a full queue) carries its own HTTP status,
code and sentence, as MLServer's errors do: views raise it or let it pass, and never map it themselves.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from marshmallow import Schema, fields
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An expected failure with its HTTP status, a short code, a sentence and optional details."""

    def __init__(self, status: int, error: str, message: str, headers: dict | None = None, **details):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.details = details


class DomainError(Exception):
    """A failure of the domain that knows how a client is told: its status, code, sentence and headers.

    Subclasses set `status` and `code`, and `client_message()` where the exception's own text (which
    may hold URLs or hosts) must stay in the log.
    """

    status = 500
    code = "internal_error"
    headers: dict = {}
    log_level = logging.INFO

    def client_message(self) -> str:
        return str(self)


def _domain_error(exc: DomainError):
    log.log(exc.log_level, "%s: %s", exc.code, exc)
    return jsonify({"error": exc.code, "message": exc.client_message()}), exc.status, exc.headers


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


_MESSAGES = {
    404: "No such endpoint. GET /openapi.json lists them all; /docs shows them.",
    405: "This endpoint does not accept that method.",
    413: "The request body is over the size limit.",
    415: "Send the body as JSON with the header Content-Type: application/json.",
}


def register_error_handlers(app: Flask) -> None:
    """One handler for every error, on the app, so unmatched URLs and 500s are JSON too."""

    app.register_error_handler(DomainError, _domain_error)

    @app.errorhandler(APIError)
    def api_error(exc: APIError):
        return jsonify({"error": exc.error, "message": exc.message, **exc.details}), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = _MESSAGES.get(exc.code or 500, exc.description or "")
        if exc.code == 413:
            message = f"The request body is over the size limit of {app.config['MAX_CONTENT_LENGTH']} bytes."
        body = {"error": _http_code(exc), "message": message}
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            body["allowed_methods"] = sorted(exc.valid_methods)
        response = jsonify(body)
        response.status_code = exc.code or 500
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify({"error": "internal_error", "message": "The server failed; the error is in its log."}), 500


class ErrorSchema(Schema):
    """The one shape of every error answer, for the OpenAPI document."""

    error = fields.String(required=True, metadata={"example": "invalid_input"})
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "What is wrong, per field (or per row of a batch)."})
    example = fields.Dict(metadata={"description": "A row that this model accepts, sendable as-is."})
    error_code = fields.String(
        metadata={"description": "MLflow's error code, on /invocations (what MLflow's scoring server sends)."}
    )
    allowed_methods = fields.List(fields.String(), metadata={"description": "On a 405: the methods this path takes."})
    job = fields.Dict(metadata={"description": "On a failed waited /train: the job, with its error."})
