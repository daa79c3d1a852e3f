"""Logging: one JSON line per request, a request id on every line, secrets kept out (LOG_FORMAT=text for a terminal).

Every record inside a request carries `request_id` (the client's `X-Request-ID`, sanitised, or a new
one, echoed in the answer); inside a training job's process every record carries `job_id` (`set_job_id`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid

from flask import Flask, g, request
from pythonjsonlogger.orjson import OrjsonFormatter

LOG_FORMATS = ("json", "text")
REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9._:@/+=-]")
# A password in a URI (scheme://user:password@host) and bearer tokens, wherever a message carries them.
_URI_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)")
# A token (RFC 6750's characters) with a digit or symbol in it, or 12 characters or more: "the Bearer scheme"
# stays a sentence. The configured tokens are redacted wherever they appear, whatever they look like.
_BEARER = re.compile(r"(?i)(bearer\s+)(?=[A-Za-z]*[0-9._~+/=-]|[A-Za-z]{12})[^\s'\"]+")
_TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s%(context)s: %(message)s"
_JSON_FIELDS = "%(levelname)s %(name)s %(process)d %(message)s"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_process_job_id: str | None = None  # a job's own process: every thread's lines carry it
access_log = logging.getLogger("serving.access")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """The text without URI passwords, bearer tokens or any of `secrets`."""
    # Each pattern needs its marker in the text: a substring test is a tenth of a regex pass, and most lines
    # (one access line per request) carry neither.
    if "://" in text:
        text = _URI_PASSWORD.sub(r"\g<head>***", text)
    if "bearer" in text.lower():
        text = _BEARER.sub(r"\1***", text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class ContextFilter(logging.Filter):
    """Adds the request id and job id of the current context, and redacts secrets from the message."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, job_id = _request_id.get(), _process_job_id
        if request_id and not hasattr(record, "request_id"):
            record.request_id = request_id
        if job_id and not hasattr(record, "job_id"):
            record.job_id = job_id
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class TextFormatter(logging.Formatter):
    """One plain line, with the request or job id in brackets after the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        record.context = "".join(
            f" [{key}={getattr(record, key)}]" for key in ("request_id", "job_id") if hasattr(record, key)
        )
        return super().format(record)


def make_formatter(log_format: str) -> logging.Formatter:
    """JSON lines (the default; `time` in ISO 8601, UTC) or plain text for a terminal."""
    if log_format == "text":
        return TextFormatter(_TEXT_FORMAT)
    # orjson encodes a line in half the time of the json module (one per request on the hot path): the same
    # fields and values, without the spaces after separators, UTF-8 as is.
    return OrjsonFormatter(_JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"}, timestamp="time")


def make_handler(log_format: str = "json", secrets: tuple[str, ...] = ()) -> logging.Handler:
    """A stderr handler in `log_format` that adds the request and job ids and redacts secrets."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(ContextFilter(secrets))
    handler._serving_handler = True  # ours: replaced, never stacked, when logging is set up again
    return handler


def check_log_format(log_format: str) -> str:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {LOG_FORMATS}, not {log_format!r}")
    return log_format


def configure_logging(log_format: str = "json", level: str = "INFO", secrets: tuple[str, ...] = ()) -> None:
    """Send every log record (the root logger's) to stderr in `log_format`, with context and redaction."""
    check_log_format(log_format)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_serving_handler", False):
            root.removeHandler(handler)
    root.addHandler(make_handler(log_format, secrets))
    root.setLevel(level.upper())
    # Werkzeug's own request line would duplicate ours (and carries the query string).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)


def gunicorn_logconfig(log_format: str = "json", level: str = "INFO", secrets: tuple[str, ...] = ()) -> dict:
    """gunicorn's `logconfig_dict`: its own lines (start-up, workers) in the same format, through the root.

    Its access log is off: the app writes one line per request, with the model version and request id.
    """
    check_log_format(log_format)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": level.upper(), "handlers": ["serving"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
        "handlers": {
            "serving": {"()": "kernel.logs.make_handler", "log_format": log_format, "secrets": tuple(secrets)}
        },
        "formatters": {},
    }


def request_id_from(header: str | None) -> str:
    """The client's request id, with only safe characters and bounded length; a new one if none is left."""
    cleaned = _REQUEST_ID_CHARACTERS.sub("", header or "")[:MAX_REQUEST_ID_LENGTH]
    return cleaned or uuid.uuid4().hex


def set_job_id(job_id: str | None) -> None:
    """Every later log record of this process, from any thread, carries `job_id`: for a job's own process."""
    global _process_job_id
    _process_job_id = job_id


def note_model(ref) -> None:
    """Record the model version a request used, for its log line (and the latency metric's labels)."""
    g.model_ref = ref


def instrument(app: Flask) -> None:
    """A request id for every request, echoed in `X-Request-ID`, and one access line when it is answered."""

    @app.before_request
    def bind_request_id():
        g.request_started = time.perf_counter()
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.request_id_token = _request_id.set(g.request_id)

    @app.after_request
    def log_request(response):
        request_id = g.get("request_id") or request_id_from(None)
        response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("request_started")
        fields = {
            "request_id": request_id,
            "method": request.method,
            "path": request.path,  # never the query string: it may carry what should not be logged
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3) if started else None,
        }
        ref = g.get("model_ref")
        if ref is not None:
            fields.update(model=ref.name, model_version=ref.version)
        route = response.headers.get("X-Model-Route")  # active, version, alias; stable, candidate, fallback
        if route is not None:
            fields["model_route"] = route
        access_log.info("%s %s %s", request.method, request.path, response.status_code, extra=fields)
        return response

    @app.teardown_request
    def unbind_request_id(exc=None):
        token = g.pop("request_id_token", None)
        if token is not None:
            _request_id.reset(token)
