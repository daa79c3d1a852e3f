"""The active model of this process, kept in step with the MLflow alias and with the other workers.

The alias (`ACTIVE_ALIAS` on one version in MLflow) is the only switch: `/use-model`, a training job
and any MLflow client (the UI, `set_registered_model_alias`) move it, and nothing else decides what
serves. Below it, caches, from slowest to fastest to read:
- this machine's pointer file (`<state dir>/active.json`, serving/pointer.py): the version the workers
  of one machine serve and the alias's status (`ok`, `missing`, `conflict`), with a generation number
  in shared memory bumped on each rewrite;
- `ModelStore.current`, the object the requests of this process use.
One worker per machine (the holder of `<state dir>/poll.lock`) reads the alias every
`ACTIVE_POLL_SECONDS` (one MLflow search), loads what it names and rewrites the pointer; the others
follow the pointer. Every `/predict` compares the generation with the one it last saw (a memory read),
so a worker that did not make the swap loads the new version from the machine's model cache
(serving/model_cache.py) before its next answer; the watcher thread (serving/watcher.py) preloads it.
`/use-model` moves the alias, rewrites the pointer and swaps this process before it answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from kernel.locks import KeptLock, file_lock
from kernel.registry import AliasState, ModelNotFound, ModelRef, Registry, RegistryUnavailable
from kernel.rollout_spec import RolloutSpec
from serving.loaded_model import LoadedModel, ModelLoadError
from serving.model_cache import ModelCache, StateNotWritable
from serving.pointer import Generation, Pointer, PointerState
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
        serving_runtime: str = "auto",
        cache_versions: int = 3,
    ):
        self.registry = registry
        self.state_dir = Path(state_dir)
        self.bootstrap = bootstrap
        self.cache = ModelCache(registry, self.state_dir, serving_runtime, cache_versions)
        self.cache.pinned = self._pinned
        self.pointer = Pointer(self.state_dir)
        self.generation = Generation(self.state_dir, self.pointer)
        self.poll_lock = KeptLock(self.state_dir / "poll.lock")
        self.watcher = Watcher(self.get, self.follow_registry, poll_seconds, self.poll_lock.held)
        self.current: LoadedModel | None = None
        self.alias = AliasState()  # the alias as this machine last read it (`ok` once something serves)
        self.rollout: RolloutSpec | None = None  # the running rollout as this machine last read it
        self.last_error: str | None = None
        self.registry_available = True
        self._seen: object = None  # the generation when this process last followed the pointer
        # Run after each poll (the rollout's owner); one that returns True moved the rollout, read again at once.
        self.poll_hooks: list[Callable[[AliasState], bool | None]] = []
        self._swap_lock = threading.Lock()

    def _pinned(self) -> set[ModelRef]:
        """Versions the model cache never evicts: the one this process serves, and a rollout's candidate."""
        current, rollout = self.current, self.rollout
        return ({current.ref} if current is not None else set()) | ({rollout.candidate} if rollout else set())

    # ---- the request path ------------------------------------------------------------------
    def get(self) -> LoadedModel | None:
        """The model to serve now: follows this machine's pointer when its generation moved (a memory read)."""
        seen = self.generation.value()
        if seen != self._seen:
            self._follow_pointer(seen)
        return self.current

    def alias_status(self) -> dict:
        """What /ready and /metrics say of the alias: its name, `ok`/`missing`/`conflict`, the holders."""
        self.get()
        alias = self.alias
        return {"name": self.registry.alias, "status": alias.status, "holders": [h.as_dict() for h in alias.holders]}

    def _follow_pointer(self, seen: object) -> None:
        with self._swap_lock:
            if seen == self._seen:
                return  # another thread followed it while we waited
            state = self.pointer.read_state()
            if state.ref is not None or state.alias.holders:  # the file said something
                self.alias = state.alias
                self.rollout = state.rollout
            if state.ref and (self.current is None or self.current.ref != state.ref):
                try:
                    self._swap(self.cache.load(state.ref, download=False))
                except (ModelLoadError, RegistryUnavailable, FileNotFoundError) as exc:
                    self._remember_failure(state.ref, exc)
            self._seen = seen

    def _publish(self, state: PointerState) -> None:
        """Rewrite this machine's pointer and tell its workers (call under the activate lock)."""
        self.pointer.write(state)
        self.generation.bump()

    # ---- swaps -------------------------------------------------------------------------------
    def activate(self, ref: ModelRef) -> LoadedModel:
        """Make `ref` active everywhere: load it fully, then move the alias, then this machine's pointer, us.

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
                    self._publish(PointerState(ref, AliasState((ref,)), self.pointer.read_state().rollout))
                except OSError:
                    if previous is not None:
                        self.registry.set_active_model(previous)  # the alias must not name what we cannot serve
                    raise
        except OSError as exc:  # a read-only or full disk: the cache, the lock or the pointer
            raise StateNotWritable(self.state_dir, exc) from exc
        with self._swap_lock:
            self._swap(loaded)
            self.alias = AliasState((ref,))
            self._seen = None  # re-read the pointer next time: another worker may have swapped since
        return loaded

    def follow_registry(self) -> None:
        """One poll: read the alias once; if it names another version, load it and point this machine at it.

        Never raises for a registry, model or state-folder problem (a read-only or full disk): it is
        recorded in `last_error`, the current model keeps serving, and a version that failed is not
        tried again for a while. A worker forked while the folder is read-only still boots.
        """
        self._guarded(self._follow_registry)

    def catch_up(self, ref: ModelRef) -> None:
        """Serve `ref` on this machine now if the alias names it (read-your-writes after a job).

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
        alias = self.registry.read_alias_state()
        ref = alias.active
        if ref is None and alias.models == 0 and self.current is None and self.bootstrap is not None:
            ref = self._bootstrap()
            alias = AliasState((ref,)) if ref else alias
        self._follow_alias(alias, ref)
        moved = [hook(alias) for hook in self.poll_hooks]
        if any(moved):  # a hook moved the rollout (a decision, or a promotion): read it now, not a poll later
            alias = self.registry.read_alias_state()
            self._follow_alias(alias, alias.active)

    def _follow_alias(self, alias: AliasState, ref: ModelRef | None) -> None:
        if ref is None:
            self._keep_serving(alias)
        else:
            cached = self.pointer.read_state()
            if cached.ref is not None and cached.ref != ref:
                log.info("the alias %r is on %s version %s; this machine's cache said version %s of %s: the alias wins",
                         self.registry.alias, ref.name, ref.version, cached.ref.version, cached.ref.name)  # fmt: skip
            self._follow_to(ref)
        self._follow_rollout(alias)

    def _follow_rollout(self, alias: AliasState) -> None:
        """End a rollout whose aliases were moved by hand (`overridden`), and hand the running one to this
        machine's workers through the pointer."""
        for spec in alias.overridden:
            holders = ", ".join(f"{h.name} version {h.version}" for h in alias.holders) or "no version"
            reason = (f"an alias was moved by hand: {self.registry.alias!r} is on {holders} (the rollout's stable "
                      f"version was {spec.stable.version}), or {self.registry.rollout_alias!r} left the candidate")  # fmt: skip
            log.warning("rollout %s overridden: %s", spec.id, reason)
            try:
                self.registry.end_rollout(spec, "overridden", reason)
            except ModelNotFound:  # another instance ended it first
                pass
        with file_lock(self.state_dir / "activate.lock"):
            cached = self.pointer.read_state()
            if cached.rollout != alias.rollout and (cached.ref is not None or cached.alias.holders):
                self._publish(PointerState(cached.ref, cached.alias, alias.rollout))
        self.rollout = alias.rollout

    def _keep_serving(self, alias: AliasState) -> None:
        """The alias is missing or on two models: serve what this machine serves, and say why."""
        names = ", ".join(f"{h.name} version {h.version}" for h in alias.holders) or "no version"
        if alias != self.alias:
            log.error("the alias %r is %s (%s): serving on what this machine serves",
                      self.registry.alias, alias.status, names)  # fmt: skip
        with file_lock(self.state_dir / "activate.lock"):
            cached = self.pointer.read_state()
            if cached.alias != alias:
                self._publish(PointerState(cached.ref, alias, cached.rollout))
        self.alias = alias
        if self.current is None and cached.ref is None:
            self.last_error = f"The MLflow alias {self.registry.alias!r} is {alias.status} ({names})."

    def _serving(self, ref: ModelRef) -> bool:
        """Whether this process serves `ref` and this machine's pointer names it, the alias read as `ok`."""
        if self.current is None or self.current.ref != ref:
            return False
        state = self.pointer.read_state()
        return state.ref == ref and state.alias == AliasState((ref,))

    def _follow_to(self, ref: ModelRef) -> None:
        """Load `ref` and point this machine at it, if the alias still names it."""
        if self._serving(ref) or self.cache.recently_failed(ref):
            return
        try:
            loaded = self.cache.load(ref, download=True)
        except (ModelLoadError, ModelNotFound) as exc:  # e.g. the active version was deleted
            self._remember_failure(ref, exc)
            return
        with file_lock(self.state_dir / "activate.lock"):
            # A /use-model on this machine may have moved the alias since our read: never let an
            # older answer overwrite a newer pointer. The next poll follows whatever is newest.
            if self.registry.get_active_model() != ref:
                return
            cached = self.pointer.read_state()
            state = PointerState(ref, AliasState((ref,)), cached.rollout)
            if cached != state:
                self._publish(state)
        with self._swap_lock:
            self._swap(loaded)
            self.alias = AliasState((ref,))
            self._seen = None  # a later swap by another worker may have landed meanwhile

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
        self.cache.mark_failed(ref, str(exc))
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
        self._seen = None  # re-read this machine's pointer on the next request
        self.watcher.start()

    def stop(self) -> None:
        """Stop the watcher thread and let another process poll."""
        self.watcher.stop()
        self.poll_lock.release()
