"""The registry's two errors, and the decorator that turns MLflow's and the network's exceptions into them."""

from __future__ import annotations

import functools
import logging

from mlflow.exceptions import MlflowException

from kernel.errors import DomainError

# A malformed version ("abc") is INVALID_PARAMETER_VALUE: for a lookup, that too is "no such model".
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"}


class RegistryError(Exception):
    """Base of the registry's errors."""


class ModelNotFound(RegistryError):
    """No registered model, version or alias by that name."""


class RegistryUnavailable(RegistryError, DomainError):
    """The tracking server (or database) did not answer: 503, the detail (URLs, hosts) only in the log."""

    status = 503
    code = "registry_unavailable"
    headers = {"Retry-After": "10"}
    log_level = logging.WARNING

    def client_message(self) -> str:
        return "The model registry (MLflow) cannot be reached; nothing was changed, and predictions still work. Try again shortly."


def translate_errors(func):
    """Turn MLflow's and the network's exceptions into the registry's two errors."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RegistryError:
            raise
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in _NOT_FOUND:
                raise ModelNotFound(exc.message) from exc
            raise RegistryUnavailable(f"MLflow did not answer: {exc.message[:300]}") from exc
        except (OSError, ConnectionError) as exc:
            raise RegistryUnavailable(f"MLflow did not answer: {exc}") from exc
        except Exception as exc:  # sqlalchemy's OperationalError and requests' errors, without importing them
            if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3"):
                raise RegistryUnavailable(f"MLflow did not answer: {str(exc)[:300]}") from exc
            raise

    return wrapper
