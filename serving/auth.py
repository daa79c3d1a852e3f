"""The management endpoints' token: required when API_TOKEN is set (production always sets one)."""

from __future__ import annotations

import functools
import hmac

from flask import current_app, request

from serving.errors import APIError


def require_token(view):
    """Reject the request with 401 unless it carries `Authorization: Bearer <API_TOKEN>`."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        token = current_app.config.get("API_TOKEN")
        if token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise APIError(
                    401,
                    "unauthorized",
                    "This endpoint needs the header 'Authorization: Bearer <token>' with the service's token.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return view(*args, **kwargs)

    return wrapper
