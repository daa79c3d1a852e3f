"""The shadow arm: the candidate scores copies of stable answers after they are sent, off the request path.

Each process has a bounded queue drained by one low-priority daemon thread. A request puts (spec, rows,
stable answer) on it and returns at once; a full queue, or a batch over `SHADOW_MAX_ROWS`, is dropped and
counted (`rollout_requests_total{arm="shadow", outcome="dropped"}`). The thread scores the same rows with
the candidate and counts, per row, whether the labels agree and the mean absolute difference of the
probabilities. The client's answer never waits for it and never depends on it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

from kernel.rollout_spec import RolloutSpec
from serving import rollout_metrics

log = logging.getLogger(__name__)


def compare(stable: dict, candidate: dict) -> tuple[int, int, float]:
    """(rows whose labels agree, rows that disagree, the sum over rows of the mean absolute probability difference)."""
    agree = sum(1 for a, b in zip(stable["predictions"], candidate["predictions"], strict=True) if a == b)
    difference = 0.0
    for p, q in zip(stable.get("probabilities") or [], candidate.get("probabilities") or [], strict=False):
        classes = set(p) | set(q)
        difference += sum(abs(p.get(c, 0.0) - q.get(c, 0.0)) for c in classes) / max(len(classes), 1)
    return agree, len(stable["predictions"]) - agree, difference


class Shadow:
    """One process's shadow queue and its thread (started on first use, and again after a fork)."""

    def __init__(self, score: Callable[[RolloutSpec, object], tuple[dict, tuple]], size: int, max_rows: int):
        self.score = score  # (spec, rows) -> the candidate's answer, as /predict gives it, and its classes
        self.size, self.max_rows = size, max_rows
        self._queue: queue.Queue | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, spec: RolloutSpec, body: object, rows: int, answer: dict) -> bool:
        """Queue the candidate's scoring of this request; False (and counted as dropped) if it cannot be."""
        if rows > self.max_rows:
            rollout_metrics.record(spec.id, "shadow", "dropped")
            return False
        self._ensure_thread()
        try:
            self._queue.put_nowait((spec, body, answer))  # type: ignore[union-attr]
            return True
        except queue.Full:
            rollout_metrics.record(spec.id, "shadow", "dropped")
            return False

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty and its last item scored (for tests: the queue is drained in the background)."""
        if self._queue is not None and self._pid == os.getpid():
            deadline = time.monotonic() + timeout
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.005)

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked worker: threads do not survive fork
            with self._lock:
                if self._pid != os.getpid():
                    self._queue = queue.Queue(maxsize=self.size)
                    threading.Thread(target=self._run, args=(self._queue,), name="shadow", daemon=True).start()
                    self._pid = os.getpid()

    def _run(self, work: queue.Queue) -> None:
        try:  # Linux: a thread's own nice value; the answers' threads keep theirs
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            spec, body, answer = work.get()
            try:
                started = time.perf_counter()
                scored, classes = self.score(spec, body)
                seconds = time.perf_counter() - started
                agree, disagree, difference = compare(answer, scored)
                rollout_metrics.record(spec.id, "shadow", "ok", seconds, scored["predictions"], classes)
                rollout_metrics.record_shadow(spec.id, agree, disagree, difference)
            except Exception as exc:  # the candidate failed on rows the stable version scored
                log.warning("rollout %s: the shadow candidate failed: %s", spec.id, exc)
                rollout_metrics.record(spec.id, "shadow", "error")
            finally:
                work.task_done()
