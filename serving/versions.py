"""Any registered version by URL: `/models/<name>/versions/<v>/predict` and `/models/<name>/aliases/<a>/predict`.

The version comes from the process's LRU of loaded versions (serving/model_cache.py), else from this
machine's folder, else from the registry; the active model does not change. An alias is resolved
through MLflow at most once per `ACTIVE_POLL_SECONDS` per process.
"""

from __future__ import annotations

import logging
import threading
import time

from kernel.errors import APIError, DomainError
from kernel.registry import ModelNotFound, ModelRef
from serving.loaded_model import LoadedModel, ModelLoadError
from serving.model_cache import StateNotWritable
from serving.model_store import ModelStore


class ModelNotLoadable(DomainError):
    """A registered version that cannot be loaded here (no files, a format refused, a runtime missing)."""

    status = 503
    code = "model_not_loadable"
    headers = {"Retry-After": "60"}
    log_level = logging.WARNING

    def __init__(self, ref: ModelRef, reason: str):
        self.ref, self.reason = ref, reason
        super().__init__(f"{ref.name} version {ref.version}: {reason}")

    def client_message(self) -> str:
        return (f"{self.ref.name} version {self.ref.version} is registered but cannot be loaded: {self.reason}. "
                "The active model is unchanged.")  # fmt: skip


def not_found(name: str, wanted: str) -> APIError:
    """404 `model_not_found` for a name with a version or alias the registry does not have."""
    return APIError(
        404,
        "model_not_found",
        f"No registered model {name!r} with {wanted}. GET /models lists the registered versions.",
    )


class Versions:
    """Finds the version a URL names and loads it into this process's LRU, without touching the active model."""

    def __init__(self, store: ModelStore, alias_seconds: float):
        self.store = store
        self.alias_seconds = alias_seconds
        self._aliases: dict[tuple[str, str], tuple[float, ModelRef]] = {}
        self._lock = threading.Lock()  # one cold load at a time per process: concurrent first uses share it

    def by_version(self, name: str, version: str) -> LoadedModel:
        """The loaded version; 404 `model_not_found`, 503 `model_not_loadable` or `registry_unavailable`."""
        ref = ModelRef(name, version)
        current = self.store.current
        if current is not None and current.ref == ref:
            return current
        loaded = self.store.cache.cached(ref)
        if loaded is not None:
            return loaded
        if not (version.isascii() and version.isdigit() and len(version) <= 18):  # MLflow's versions are int64
            raise not_found(name, f"version {version}")
        with self._lock:
            return self._load(ref)

    def by_alias(self, name: str, alias: str) -> LoadedModel:
        """The version `alias` of `name` points to (resolved at most once per poll interval), loaded."""
        key = (name, alias)
        known = self._aliases.get(key)
        if known is None or time.monotonic() - known[0] > self.alias_seconds:
            try:
                ref = self.store.registry.get_model_version_by_alias(name, alias)
            except ModelNotFound as exc:
                raise not_found(name, f"alias {alias!r}") from exc
            self._aliases[key] = known = (time.monotonic(), ref)
        return self.by_version(known[1].name, known[1].version)

    def _load(self, ref: ModelRef) -> LoadedModel:
        cache = self.store.cache
        loaded = cache.cached(ref)  # loaded by another thread while this one waited
        if loaded is not None:
            return loaded
        if cache.recently_failed(ref):
            raise ModelNotLoadable(ref, cache.failure_reason(ref))
        try:
            if not cache.on_disk(ref):
                self.store.registry.get_model_version(ref.name, ref.version)  # registered? else 404
            return cache.load(ref, download=True)
        except ModelNotFound as exc:
            raise not_found(ref.name, f"version {ref.version}") from exc
        except ModelLoadError as exc:
            cache.mark_failed(ref, str(exc))
            raise ModelNotLoadable(ref, str(exc)) from exc
        except OSError as exc:
            raise StateNotWritable(cache.state_dir, exc) from exc
