"""The active model of this process, kept in step with the registry and with the other workers.

Three places say which version is active, from slowest to fastest to read:
- the registry (MLflow): the source of truth, shared by every instance (an alias and a pointer tag);
- this machine's pointer file (`<state dir>/active.json`, serving/pointer.py), shared by the workers
  of one machine;
- `ModelStore.current`, the object the requests of this process use.
`/use-model` writes all three before it answers. Every `/predict` compares the pointer file's
stat with the one it last saw (a microsecond, no MLflow call), so a worker that did not serve the
swap loads the new version from the machine's model cache (serving/model_cache.py) before its next
answer. A watcher thread (serving/watcher.py) polls the registry every few seconds so that swaps
made on other instances arrive too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from kernel.locks import file_lock
from kernel.registry import ModelNotFound, ModelRef, Registry, RegistryUnavailable
from serving.loaded_model import LoadedModel, ModelLoadError
from serving.model_cache import ModelCache, StateNotWritable
from serving.pointer import Pointer, StatKey
from serving.watcher import Watcher

log = logging.getLogger(__name__)


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
        self.bootstrap = bootstrap
        self.cache = ModelCache(registry, self.state_dir, runtime_setting)
        self.pointer = Pointer(self.state_dir)
        self.watcher = Watcher(self.get, self.follow_registry, poll_seconds)
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.registry_available = True
        self._pointer_stat: StatKey | None = None  # the pointer's stat when this process last followed it
        self._swap_lock = threading.Lock()

    # ---- the request path ------------------------------------------------------------------
    def get(self) -> LoadedModel | None:
        """The model to serve now: follows this machine's pointer first (a stat, no MLflow call)."""
        key = self.pointer.stat_key()
        if key != self._pointer_stat:
            self._follow_pointer(key)
        return self.current

    def _follow_pointer(self, key: StatKey | None) -> None:
        with self._swap_lock:
            if key == self._pointer_stat:
                return  # another thread followed it while we waited
            ref = self.pointer.read()
            if ref and (self.current is None or self.current.ref != ref):
                try:
                    self._swap(self.cache.load(ref, download=False))
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
            loaded = self.cache.load(ref, download=True)
            with file_lock(self.state_dir / "activate.lock"):
                previous = self.registry.get_active_model()
                self.registry.set_active_model(ref)
                try:
                    self.pointer.write(ref)
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

    def catch_up(self, ref: ModelRef) -> None:
        """Serve `ref` on this machine now if the registry names it active (read-your-writes after a job).

        The narrow hook the training half calls after a job answers `activated`: it loads exactly that
        version, never bootstraps, and writes neither the job nor the registry (only this machine's pointer).
        """
        if self._serving(ref):
            return
        self._guarded(lambda: self._follow_to(ref))

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

    def _follow_registry(self) -> None:
        ref = self.registry.get_active_model()
        if ref is None:
            if self.current is None and self.bootstrap is not None:
                ref = self._bootstrap()
            if ref is None:
                return
        self._follow_to(ref)

    def _serving(self, ref: ModelRef) -> bool:
        """Whether this process serves `ref` and this machine's pointer names it."""
        return self.current is not None and self.current.ref == ref and self.pointer.read() == ref

    def _follow_to(self, ref: ModelRef) -> None:
        """Load `ref` and point this machine at it, if the registry still names it active."""
        if self._serving(ref) or self.cache.recently_failed(ref):
            return
        try:
            loaded = self.cache.load(ref, download=True)
        except (ModelLoadError, ModelNotFound) as exc:  # e.g. the active version was deleted
            self._remember_failure(ref, exc)
            return
        with file_lock(self.state_dir / "activate.lock"):
            # A /use-model on this machine may have moved the registry since our read: never let an
            # older answer overwrite a newer pointer. The next step follows whatever is newest.
            if self.registry.get_active_model() != ref:
                return
            if self.pointer.read() != ref:
                self.pointer.write(ref)
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

    def _remember_failure(self, ref: ModelRef, exc: Exception) -> None:
        """Record why `ref` did not load (health shows it) and hold off retrying it for a while."""
        self.cache.mark_failed(ref)
        self.last_error = f"{ref.name} version {ref.version} failed to load: {exc}"
        log.error(self.last_error)

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
        self._pointer_stat = None  # re-read this machine's pointer on the next request
        self.watcher.start()

    def stop(self) -> None:
        """Stop the watcher thread."""
        self.watcher.stop()
