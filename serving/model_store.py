"""The active model of this process, kept in step with the registry and with the other workers.

Three places say which version is active, from slowest to fastest to read:
- the registry (MLflow): the source of truth, shared by every instance (an alias and a pointer tag);
- this machine's pointer file (`<state dir>/active.json`), shared by the workers of one machine;
- `ModelStore.current`, the object the requests of this process use.
`/use-model` writes all three before it answers. Every `/predict` compares the pointer file's
stat with the one it last saw (a microsecond, no MLflow call), so a worker that did not serve the
swap loads the new version from the machine's model cache before its next answer. A watcher thread
polls the registry every few seconds so that swaps made on other instances arrive too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kernel.errors import DomainError
from kernel.locks import file_lock
from kernel.registry import ModelNotFound, ModelRef, Registry, RegistryUnavailable
from serving.loaded_model import LoadedModel, ModelLoadError, load_model_dir

log = logging.getLogger(__name__)

RETRY_FAILED_SECONDS = 60.0
PRELOAD_SECONDS = 0.2


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


def _check_writable(folder: Path) -> None:
    """Raise the OSError of a folder that cannot take a write (read-only or full); nothing if it can."""
    with tempfile.TemporaryFile(dir=folder) as probe:
        probe.write(b"\0" * 65536)
        probe.flush()
        os.fsync(probe.fileno())


class ModelStore:
    """Holds the active `LoadedModel`; swaps are whole-object assignments, so readers never see half."""

    def __init__(
        self,
        registry: Registry,
        state_dir: Path,
        poll_seconds: float = 5.0,
        bootstrap: Callable[[], ModelRef] | None = None,
        runtime_setting: str = "auto",
    ):
        self.registry = registry
        self.state_dir = Path(state_dir)
        self.poll_seconds = poll_seconds
        self.bootstrap = bootstrap
        self.runtime_setting = runtime_setting
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.registry_available = True
        self._pointer = self.state_dir / "active.json"
        self._pointer_stat: tuple | None = None
        self._swap_lock = threading.Lock()
        self._loaded: dict[ModelRef, LoadedModel] = {}
        self._failed: dict[ModelRef, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the request path ------------------------------------------------------------------
    def get(self) -> LoadedModel | None:
        """The model to serve now: follows this machine's pointer first (a stat, no MLflow call)."""
        try:
            stat = os.stat(self._pointer)
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            key = None
        if key != self._pointer_stat:
            self._follow_pointer(key)
        return self.current

    def _follow_pointer(self, key) -> None:
        with self._swap_lock:
            if key == self._pointer_stat:
                return  # another thread followed it while we waited
            ref = self.read_pointer()
            if ref and (self.current is None or self.current.ref != ref):
                try:
                    self._swap(self._load(ref, download=False))
                except (ModelLoadError, RegistryUnavailable, FileNotFoundError) as exc:
                    self._remember_failure(ref, exc)
            self._pointer_stat = key

    # ---- swaps -------------------------------------------------------------------------------
    def activate(self, ref: ModelRef) -> LoadedModel:
        """Make `ref` active everywhere: load it fully, then the registry, this machine's pointer, us.

        Raises ModelNotFound, RegistryUnavailable, ModelLoadError or StateNotWritable; on any of them
        nothing changed.
        """
        ref = self.registry.get_model_version(ref.name, ref.version)
        try:
            loaded = self._load(ref, download=True)
            with file_lock(self.state_dir / "activate.lock"):
                previous = self.registry.get_active_model()
                self.registry.set_active_model(ref)
                try:
                    self.write_pointer(ref)
                except OSError:
                    if previous is not None:
                        self.registry.set_active_model(previous)  # the registry must not name what we cannot serve
                    raise
        except OSError as exc:  # a read-only or full disk: the cache, the lock or the pointer
            raise StateNotWritable(self.state_dir, exc) from exc
        with self._swap_lock:
            self._swap(loaded)
            self._pointer_stat = None  # re-read the pointer next time: another worker may have swapped since
        return loaded

    def follow_registry(self) -> None:
        """One watcher step: if the registry names another version, load it and point this machine at it.

        Never raises for a registry, model or state-folder problem (a read-only or full disk): it is
        recorded in `last_error`, the current model keeps serving, and a version that failed is not
        tried again for a while. A worker forked while the folder is read-only still boots.
        """
        self._guarded(self._follow_registry)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a follow step; a registry, model or state-folder problem is recorded, never raised."""
        try:
            step()
            self.registry_available = True
        except RegistryUnavailable as exc:
            self.registry_available = False
            self.last_error = "The model registry (MLflow) cannot be reached."
            log.warning("registry unavailable: %s", exc)
        except OSError as exc:  # the state folder is read-only or full: keep serving what we have
            self.last_error = str(StateNotWritable(self.state_dir, exc))
            log.error("cannot follow the registry: %s", self.last_error)

    def catch_up(self, ref: ModelRef) -> None:
        """Serve `ref` on this machine now if the registry names it active (read-your-writes after a job).

        The narrow hook the training half calls after a job answers `activated`: it loads exactly that
        version, never bootstraps, and writes neither the job nor the registry (only this machine's pointer).
        """
        if self.current is not None and self.current.ref == ref and self.read_pointer() == ref:
            return
        self._guarded(lambda: self._follow_to(ref))

    def _follow_registry(self) -> None:
        ref = self.registry.get_active_model()
        if ref is None:
            if self.current is None and self.bootstrap is not None:
                ref = self._bootstrap()
            if ref is None:
                return
        self._follow_to(ref)

    def _follow_to(self, ref: ModelRef) -> None:
        """Load `ref` and point this machine at it, if the registry still names it active."""
        if self.current is not None and self.current.ref == ref and self.read_pointer() == ref:
            return
        if self._recently_failed(ref):
            return
        try:
            loaded = self._load(ref, download=True)
        except (ModelLoadError, ModelNotFound) as exc:  # e.g. the active version was deleted
            self._remember_failure(ref, exc)
            return
        with file_lock(self.state_dir / "activate.lock"):
            # A /use-model on this machine may have moved the registry since our read: never let an
            # older answer overwrite a newer pointer. The next step follows whatever is newest.
            if self.registry.get_active_model() != ref:
                return
            if self.read_pointer() != ref:
                self.write_pointer(ref)
        with self._swap_lock:
            self._swap(loaded)
            self._pointer_stat = None  # a later swap by another worker may have landed meanwhile

    def _bootstrap(self) -> ModelRef | None:
        """Train the default model once per machine: the lock makes the other workers wait and reuse it."""
        with file_lock(self.state_dir / "bootstrap.lock"):
            ref = self.registry.get_active_model()
            if ref is None:
                log.info("empty registry: training the default model")
                try:
                    ref = self.bootstrap()
                except RegistryUnavailable:
                    raise
                except Exception as exc:  # not ready rather than not started: the log says why
                    log.exception("training the default model failed")
                    self.last_error = f"Training the default model failed: {exc}"
                    return None
            return ref

    def _swap(self, loaded: LoadedModel) -> None:
        if self.current is None or self.current.ref != loaded.ref:
            log.info("serving %s version %s", loaded.ref.name, loaded.ref.version)
        self.current = loaded
        self.last_error = None

    # ---- loading -------------------------------------------------------------------------------
    def _load(self, ref: ModelRef, download: bool) -> LoadedModel:
        """The version in memory, from this machine's cache (downloading it first if allowed)."""
        if ref in self._loaded:
            return self._loaded[ref]
        path = self._cache_dir(ref)
        if not (path / "MLmodel").exists():
            if not download:
                raise FileNotFoundError(f"{ref.name} version {ref.version} is not in this machine's cache")
            self._download(ref, path)
        loaded = load_model_dir(path, ref, self.runtime_setting)
        # Keep the last few versions, so swapping back and forth does not reload from disk.
        self._loaded = {**dict(list(self._loaded.items())[-2:]), ref: loaded}
        self._failed.pop(ref, None)
        return loaded

    def _cache_dir(self, ref: ModelRef) -> Path:
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
                _check_writable(staging)  # MLflow reports a full disk as a failed download: say which it was
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

    def _remember_failure(self, ref: ModelRef, exc: Exception) -> None:
        self._failed[ref] = time.monotonic()
        self.last_error = f"{ref.name} version {ref.version} failed to load: {exc}"
        log.error(self.last_error)

    def _recently_failed(self, ref: ModelRef) -> bool:
        failed_at = self._failed.get(ref)
        return failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_SECONDS

    # ---- this machine's pointer ------------------------------------------------------------------
    def read_pointer(self) -> ModelRef | None:
        try:
            data = json.loads(self._pointer.read_text())
            return ModelRef(data["name"], str(data["version"]))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def write_pointer(self, ref: ModelRef) -> None:
        """Atomically replace the pointer (a new inode, so every worker's stat sees the change)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".active-", dir=self.state_dir)
        with os.fdopen(handle, "w") as file:
            json.dump(ref.as_dict(), file)
        os.replace(staging, self._pointer)

    # ---- start and the watcher -----------------------------------------------------------------
    def start(self, watch: bool = True) -> None:
        """Load the active model now (bootstrapping if allowed), then keep following in the background.

        The workers of one machine start one at a time: the first creates a local SQLite store's
        tables (concurrent creation races in MLflow's migrations) and bootstraps; the rest reuse it.
        """
        with file_lock(self.state_dir / "start.lock"):
            self.follow_registry()
        if self.current is None and not self.registry_available:
            # MLflow is down at start: serve what this machine served last, if it has it.
            self.get()
        if watch:
            self.start_watcher()

    def start_watcher(self) -> None:
        """Follow the registry in a background thread (in each gunicorn worker: threads do not survive fork)."""
        self._stop = threading.Event()
        self._pointer_stat = None  # re-read this machine's pointer on the next request
        self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while not self._stop.wait(PRELOAD_SECONDS):
            try:
                self.get()  # preload swaps made by other workers, so requests rarely pay for the load
                if time.monotonic() >= next_poll:
                    self.follow_registry()
                    next_poll = time.monotonic() + self.poll_seconds
            except Exception:  # the watcher must outlive any one failure
                log.exception("model watcher step failed")
                next_poll = time.monotonic() + self.poll_seconds
