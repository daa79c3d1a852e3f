"""Who may call: the management token (always required unless API_AUTH=off), PREDICT_TOKEN, the Host check.

`make token` (`main`) prints the management token, generating it if need be.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import secrets
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, current_app, request

from kernel.config import ConfigError, Settings, settings_or_exit
from kernel.errors import APIError

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"
# Rules under these need the management token: /train, /train/jobs/<id> (and whatever /train/... comes next).
MANAGEMENT_RULES = ("/train", "/use-model", "/rollout", "/feedback")
FEEDBACK_RULE = "/feedback"  # also takes FEEDBACK_TOKEN, when set: a labelling team needs no management token
PREDICT_RULES = ("/predict", "/invocations")


@dataclass(frozen=True)
class Tokens:
    """The tokens the app checks; None means that group of endpoints is open. Never printed."""

    management: str | None = field(repr=False)
    predict: str | None = field(repr=False)
    feedback: str | None = field(default=None, repr=False)

    def for_rule(self, path: str) -> tuple[str, ...] | None:
        """The tokens any one of which opens the management endpoint at `path`; None: it is open."""
        if self.management is None:
            return None
        if path == FEEDBACK_RULE and self.feedback is not None:
            return (self.management, self.feedback)
        return (self.management,)


def token_file(settings: Settings) -> Path:
    return Path(settings.STATE_DIR) / TOKEN_FILE


def ensure_token(path: Path) -> tuple[str, bool]:
    """The token kept in `path`, made (random, mode 0600) if there is none; returns (token, made_here).

    Safe when several processes start at once (gunicorn workers, a preloading master): each writes
    its own candidate to a private file and hard-links it to `path`, which fails if the name exists,
    so exactly one candidate wins and every process reads that one; nobody ever sees a half-written file.
    """
    try:
        return _read_token(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as output:
            output.write(secrets.token_urlsafe(32) + "\n")
            output.flush()
            os.fsync(output.fileno())
        try:
            os.link(candidate, path)
            made = True
        except FileExistsError:
            made = False
    finally:
        candidate.unlink(missing_ok=True)
    return _read_token(path), made


def _read_token(path: Path) -> str:
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to another user; delete it or set API_TOKEN")
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning("%s was readable by others; made it readable only by its owner (0600)", path)
        os.chmod(path, 0o600)
    token = path.read_text().strip()
    if not token:
        raise ConfigError(f"{path} is empty; delete it to have a new token made, or set API_TOKEN")
    return token


def management_token(settings: Settings) -> str | None:
    """The token /train and /use-model require: API_TOKEN, else the one kept in STATE_DIR; None with API_AUTH=off."""
    if not settings.API_AUTH:
        log.warning(
            "API_AUTH=off: /train, /train/jobs, /use-model and /rollout answer anyone who can reach this service, "
            "without a token. Unset API_AUTH to require one."
        )
        return None
    if settings.API_TOKEN is not None:
        return settings.API_TOKEN.get_secret_value()
    path = token_file(settings)
    try:
        token, made = ensure_token(path)
    except OSError as exc:
        # Closed, not open: a token nobody knows. Predictions go on; management waits for API_TOKEN.
        log.error("Could not keep an API token in %s (%s): /train, /use-model and /rollout refuse every request "
                  "until API_TOKEN is set or the folder is writable.", path, exc.strerror or exc)  # fmt: skip
        return secrets.token_urlsafe(32)
    if made:
        log.warning(
            "Generated the API token for /train, /train/jobs, /use-model and /rollout: %s\n"
            "    It is kept in %s (readable only by its owner); `make token` prints it.\n"
            "    Send it in the Authorization header with the Bearer scheme (the README shows how). Set API_TOKEN to choose your own.",
            token,
            path,
        )
    return token


def init_app(app: Flask, settings: Settings) -> None:
    """Resolve the tokens once at start and check every request's Host and token before its view runs."""
    predict = settings.PREDICT_TOKEN.get_secret_value() if settings.PREDICT_TOKEN else None
    feedback = settings.FEEDBACK_TOKEN.get_secret_value() if settings.FEEDBACK_TOKEN else None
    app.extensions["auth"] = Tokens(management_token(settings), predict, feedback)
    allowed = settings.allowed_hosts()
    if allowed is not None:
        app.before_request(functools.partial(check_host, frozenset(allowed)))
    app.before_request(check_token)


def _host_name(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '[::1]' (lower case); any port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_host(allowed: frozenset[str]) -> None:
    """Against DNS rebinding: a page from another site that resolves its own name to this machine
    reaches a loopback-bound service with its own name in Host. Only the names in `allowed` are answered."""
    if _host_name(request.headers.get("Host", "")) not in allowed:
        raise APIError(
            400,
            "host_not_allowed",
            f"This service answers only requests addressed to {', '.join(sorted(allowed))} (any port); "
            "set ALLOWED_HOSTS to add a name.",
        )


def check_token() -> None:
    """Before every view: the management endpoints need the management token; /predict needs PREDICT_TOKEN if set."""
    rule = request.url_rule
    if rule is None:  # an unmatched URL or method: 404/405 as usual
        return
    tokens: Tokens = current_app.extensions["auth"]
    if _is_management(rule.rule):
        _require_management(tokens, rule.rule)
    elif rule.rule in PREDICT_RULES:
        _require(tokens.predict, "PREDICT_TOKEN")


def _is_management(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in MANAGEMENT_RULES)


def needs_token(path: str, tokens: Tokens) -> bool:
    """Whether the endpoint at `path` (a URL rule or an OpenAPI path) asks for a token with these settings."""
    if _is_management(path):
        return tokens.management is not None
    return path in PREDICT_RULES and tokens.predict is not None


def _require_management(tokens: Tokens, path: str) -> None:
    accepted = tokens.for_rule(path)
    if accepted is None:
        return
    which = "the service's API token (`make token` prints it)"
    _require(accepted, which if len(accepted) == 1 else f"{which} or FEEDBACK_TOKEN")


def _require(token: str | tuple[str, ...] | None, which: str) -> None:
    """The request's bearer token must equal `token` (or one of them); every one is compared, in constant time."""
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    sent = credentials.strip().encode()
    matches = [hmac.compare_digest(sent, each.encode()) for each in ((token,) if isinstance(token, str) else token)]
    if scheme.lower() != "bearer" or not any(matches):
        raise APIError(
            401,
            "unauthorized",
            f"This endpoint needs the header 'Authorization: Bearer <token>' with {which}.",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_token(view):
    """The management token, checked by the view too (`check_token` already did, by the view's URL rule)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        _require_management(current_app.extensions["auth"], request.url_rule.rule if request.url_rule else "")
        return view(*args, **kwargs)

    return wrapper


def main() -> int:
    """`make token`: print the management token (the one kept in STATE_DIR is made if there is none)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    settings = settings_or_exit()
    if not settings.API_AUTH:
        print("API_AUTH=off: the management endpoints take no token.", file=sys.stderr)
        return 1
    if settings.API_TOKEN is not None:
        print(settings.API_TOKEN.get_secret_value())
        return 0
    try:
        token, _ = ensure_token(token_file(settings))
    except (OSError, ConfigError) as exc:
        print(f"No API token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0
