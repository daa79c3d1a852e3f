"""This machine's model cache: a folder per downloaded version, the recently used versions in memory
(least recently used out first, pinned ones never), and a pause before a version that failed to load
is tried again."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kernel.errors import DomainError
from kernel.registry import ModelNotFound, ModelRef, Registry, RegistryUnavailable
from serving.loaded_model import LoadedModel, ModelLoadError, load_model_dir

RETRY_FAILED_SECONDS = 60.0


class StateNotWritable(DomainError):
    """This machine's state folder (model cache, pointer, locks) cannot be written: read-only or full."""

    status = 503
    code = "state_not_writable"
    headers = {"Retry-After": "30"}
    log_level = logging.ERROR

    def __init__(self, folder: Path, exc: OSError):
        self.reason = exc.strerror or str(exc)  # "Read-only file system", "No space left on device"
        super().__init__(f"{folder}: {self.reason}")

    def client_message(self) -> str:
        return (f"This machine's state folder (STATE_DIR) cannot be written ({self.reason}); nothing was changed "
                "and the previous model keeps serving. Free space or make it writable, then retry.")  # fmt: skip


def check_writable(folder: Path) -> None:
    """Raise the OSError of a folder that cannot take a write (read-only or full); nothing if it can."""
    with tempfile.TemporaryFile(dir=folder) as probe:
        probe.write(b"\0" * 65536)
        probe.flush()
        os.fsync(probe.fileno())


class ModelCache:
    """Finds and fetches versions: from memory, else from this machine's folder, else from the registry."""

    def __init__(self, registry: Registry, state_dir: Path, serving_runtime: str = "auto", capacity: int = 3):
        self.registry = registry
        self.state_dir = Path(state_dir)
        self.serving_runtime = serving_runtime
        self.capacity = capacity  # SERVING_CACHE_VERSIONS: versions kept in memory besides the pinned ones
        self.pinned: Callable[[], set[ModelRef]] = set  # never evicted: the store pins the active version
        self._loaded: OrderedDict[ModelRef, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # request threads and the watcher share the LRU
        self._failed: dict[ModelRef, tuple[float, str]] = {}

    def cached(self, ref: ModelRef) -> LoadedModel | None:
        """The version if it is in memory (now the most recently used), else None; no disk, no MLflow."""
        with self._lock:
            loaded = self._loaded.get(ref)
            if loaded is not None:
                self._loaded.move_to_end(ref)
            return loaded

    def in_memory(self) -> list[ModelRef]:
        """The versions in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def on_disk(self, ref: ModelRef) -> bool:
        """Whether this machine's folder holds the version's files."""
        return (self.folder(ref) / "MLmodel").exists()

    def _keep(self, ref: ModelRef, loaded: LoadedModel) -> None:
        """Add to memory, evicting the least recently used unpinned versions beyond `capacity`."""
        with self._lock:
            self._loaded[ref] = loaded
            self._loaded.move_to_end(ref)
            keep = self.pinned() | {ref}
            for old in [old for old in self._loaded if old not in keep]:
                if len(self._loaded) <= self.capacity:
                    break
                del self._loaded[old]

    def load(self, ref: ModelRef, download: bool) -> LoadedModel:
        """The version in memory, from this machine's folder (downloading it first if `download`).

        Raises ModelLoadError (including a version the registry has no files for), FileNotFoundError
        (not on this machine and `download` is false), RegistryUnavailable, or OSError (the folder
        cannot be written).
        """
        cached = self.cached(ref)
        if cached is not None:
            return cached
        path = self.folder(ref)
        if not (path / "MLmodel").exists():
            if not download:
                raise FileNotFoundError(f"{ref.name} version {ref.version} is not in this machine's cache")
            self._download(ref, path)
        loaded = load_model_dir(path, ref, self.serving_runtime)
        self._keep(ref, loaded)
        self._failed.pop(ref, None)
        return loaded

    def folder(self, ref: ModelRef) -> Path:
        """One folder per registered version; the hash keeps names that read alike ("a b", "a_b") apart."""
        if not ref.version.isdigit():
            raise ModelLoadError(f"{ref.name}: {ref.version!r} is not a version number")
        readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in ref.name)[:80]
        digest = hashlib.sha256(ref.name.encode()).hexdigest()[:12]
        return self.state_dir / "models" / f"{readable}-{digest}" / ref.version

    def _download(self, ref: ModelRef, path: Path) -> None:
        """Download into a temporary folder, then rename: a reader never sees a half-written model."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=path.parent))
        try:
            try:
                downloaded = self.registry.download_model_version(ref, staging)
            except ModelNotFound as exc:
                raise ModelLoadError(f"{ref.name} version {ref.version} has no model files: {exc}") from exc
            except RegistryUnavailable:
                check_writable(staging)  # MLflow reports a full disk as a failed download: say which it was
                raise
            if path.exists() and not (path / "MLmodel").exists():
                shutil.rmtree(path, ignore_errors=True)  # left over from an interrupted download
            try:
                os.rename(downloaded, path)
            except OSError:
                if not (path / "MLmodel").exists():  # another worker finished the same download first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def mark_failed(self, ref: ModelRef, reason: str = "") -> None:
        """Remember that `ref` failed to load now, and why; a later successful load forgets it."""
        self._failed[ref] = (time.monotonic(), reason)

    def recently_failed(self, ref: ModelRef) -> bool:
        """Whether `ref` failed to load less than RETRY_FAILED_SECONDS ago."""
        failed = self._failed.get(ref)
        return failed is not None and time.monotonic() - failed[0] < RETRY_FAILED_SECONDS

    def failure_reason(self, ref: ModelRef) -> str:
        """Why `ref` last failed to load ("" if it did not)."""
        return self._failed.get(ref, (0.0, ""))[1]
