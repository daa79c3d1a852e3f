"""Every error is JSON of one shape: {"error": code, "message": sentence, ...details}."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
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


def _http_code(exc: HTTPException) -> str:
    return (exc.name or "error").lower().replace(" ", "_").replace("'", "")


def registry_unavailable(exc: Exception, consequence: str) -> APIError:
    """503 for an unreachable tracking server; the detail (URLs, hosts) stays in the log, not the answer."""
    log.warning("registry unavailable: %s", exc)
    return APIError(
        503,
        "registry_unavailable",
        f"The model registry (MLflow) cannot be reached; {consequence}. Try again shortly.",
        headers={"Retry-After": "10"},
    )


_MESSAGES = {
    404: "No such endpoint. GET /openapi.json lists them all; /docs shows them.",
    405: "This endpoint does not accept that method.",
    413: "The request body is over the size limit.",
    415: "Send the body as JSON with the header Content-Type: application/json.",
}


def register_error_handlers(app: Flask) -> None:
    """One handler for every error, on the app, so unmatched URLs and 500s are JSON too."""

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
