"""The shadow arm: the candidate scores copies of stable answers after they are sent, off the request path.

Each process has a bounded queue drained by one low-priority daemon thread. A request puts (spec, rows,
stable answer) on it and returns at once; a full queue, or a batch over `SHADOW_MAX_ROWS`, is dropped and
counted (`rollout_requests_total{arm="shadow", outcome="dropped"}`). The thread scores the same rows with
the candidate and counts, per row, whether the labels agree and the mean absolute difference of the
probabilities. The client's answer never waits for it and never depends on it.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import statistics
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
    """One process's shadow queue and its thread (started on first use, and again after a fork).

    `inline` (Lambda: one process, frozen after each answer, so a thread would not run between answers):
    the candidate scores within the request, after the stable answer is made, on a sample of the shadowed
    requests (`inline_sample`), and only while the median of its last scoring times is under
    `inline_budget_ms`; otherwise the request is skipped and counted as dropped. One request in
    PROBE_EVERY is still scored while over the budget, so the median can come back under it.
    """

    PROBE_EVERY = 50
    TIMES_KEPT = 21

    def __init__(self, score: Callable[[RolloutSpec, object], tuple[dict, tuple]], size: int, max_rows: int,
                 inline: bool = False, inline_budget_ms: float = 5.0, inline_sample: float = 0.1):  # fmt: skip
        self.score = score  # (spec, rows) -> the candidate's answer, as /predict gives it, and its classes
        self.size, self.max_rows = size, max_rows
        self.inline, self.inline_budget, self.inline_sample = inline, inline_budget_ms / 1000, inline_sample
        self._times: collections.deque[float] = collections.deque(maxlen=self.TIMES_KEPT)
        self._skipped = 0
        self._queue: queue.Queue | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def submit(self, spec: RolloutSpec, body: object, rows: int, answer: dict) -> bool:
        """Queue the candidate's scoring of this request; False (and counted as dropped) if it cannot be."""
        if rows > self.max_rows:
            rollout_metrics.record(spec.id, "shadow", "dropped")
            return False
        if self.inline:
            return self._inline(spec, body, answer)
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

    def _inline(self, spec: RolloutSpec, body: object, answer: dict) -> bool:
        if random.random() >= self.inline_sample:  # noqa: S311 - a sample, not a secret
            return False
        over = len(self._times) >= 3 and statistics.median(self._times) > self.inline_budget
        if over:
            self._skipped += 1
            if self._skipped % self.PROBE_EVERY:
                rollout_metrics.record(spec.id, "shadow", "dropped")
                return False
        self._score_one(spec, body, answer)
        return True

    def _score_one(self, spec: RolloutSpec, body: object, answer: dict) -> None:
        try:
            started = time.perf_counter()
            scored, classes = self.score(spec, body)
            seconds = time.perf_counter() - started
            self._times.append(seconds)
            agree, disagree, difference = compare(answer, scored)
            rollout_metrics.record(spec.id, "shadow", "ok", seconds, scored["predictions"], classes)
            rollout_metrics.record_shadow(spec.id, agree, disagree, difference)
        except Exception as exc:  # the candidate failed on rows the stable version scored
            log.warning("rollout %s: the shadow candidate failed: %s", spec.id, exc)
            rollout_metrics.record(spec.id, "shadow", "error")

    def _run(self, work: queue.Queue) -> None:
        try:  # Linux: a thread's own nice value; the answers' threads keep theirs
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            spec, body, answer = work.get()
            try:
                self._score_one(spec, body, answer)
            finally:
                work.task_done()
