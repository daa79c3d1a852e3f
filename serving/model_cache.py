"""This machine's model cache: a folder per downloaded version, the last few versions in memory, and
a pause before a version that failed to load is tried again."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from kernel.errors import DomainError
from kernel.registry import ModelNotFound, ModelRef, Registry, RegistryUnavailable
from serving.loaded_model import LoadedModel, ModelLoadError, load_model_dir

RETRY_FAILED_SECONDS = 60.0
IN_MEMORY = 3  # versions kept loaded, so swapping back and forth does not reload from disk


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

    def __init__(self, registry: Registry, state_dir: Path, runtime_setting: str = "auto"):
        self.registry = registry
        self.state_dir = Path(state_dir)
        self.runtime_setting = runtime_setting
        self._loaded: dict[ModelRef, LoadedModel] = {}
        self._failed: dict[ModelRef, float] = {}

    def load(self, ref: ModelRef, download: bool) -> LoadedModel:
        """The version in memory, from this machine's folder (downloading it first if `download`).

        Raises ModelLoadError (including a version the registry has no files for), FileNotFoundError
        (not on this machine and `download` is false), RegistryUnavailable, or OSError (the folder
        cannot be written).
        """
        if ref in self._loaded:
            return self._loaded[ref]
        path = self.folder(ref)
        if not (path / "MLmodel").exists():
            if not download:
                raise FileNotFoundError(f"{ref.name} version {ref.version} is not in this machine's cache")
            self._download(ref, path)
        loaded = load_model_dir(path, ref, self.runtime_setting)
        self._loaded = {**dict(list(self._loaded.items())[-(IN_MEMORY - 1) :]), ref: loaded}
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

    def mark_failed(self, ref: ModelRef) -> None:
        """Remember that `ref` failed to load now; a later successful load forgets it."""
        self._failed[ref] = time.monotonic()

    def recently_failed(self, ref: ModelRef) -> bool:
        """Whether `ref` failed to load less than RETRY_FAILED_SECONDS ago."""
        failed_at = self._failed.get(ref)
        return failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_SECONDS
