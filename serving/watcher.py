"""The model watcher: a background thread that keeps a process's model in step with its machine and the registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

PRELOAD_SECONDS = 0.2


class Watcher:
    """Every PRELOAD_SECONDS runs `follow_pointer`; every `poll_seconds`, `follow_registry` as well, if `may_poll()`.

    `may_poll` is the machine's poll lock: one worker per machine reads MLflow, the others follow the
    pointer it writes (and take the lock over within PRELOAD_SECONDS if that worker dies).
    Threads do not survive fork: each gunicorn worker starts its own (service/forking.py).
    """

    def __init__(
        self,
        follow_pointer: Callable[[], object],
        follow_registry: Callable[[], None],
        poll_seconds: float,
        may_poll: Callable[[], bool] = lambda: True,
    ):
        self.follow_pointer = follow_pointer
        self.follow_registry = follow_registry
        self.poll_seconds = poll_seconds
        self.may_poll = may_poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (a daemon: it never holds up the process's exit)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop and wait up to 5 seconds for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while not self._stop.wait(PRELOAD_SECONDS):
            try:
                self.follow_pointer()  # preload swaps made by other workers, so requests rarely pay for the load
                if time.monotonic() >= next_poll and self.may_poll():
                    self.follow_registry()
                    next_poll = time.monotonic() + self.poll_seconds
            except Exception:  # the watcher must outlive any one failure
                log.exception("model watcher step failed")
                next_poll = time.monotonic() + self.poll_seconds
