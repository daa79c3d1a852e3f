"""The shadow arm: the candidate scores copies of stable answers after they are sent, off the request path.

Each process has a bounded queue drained by one low-priority daemon thread. A request puts (spec, rows,
stable answer) on it and returns at once (the thread gathers what queues within LINGER and scores it in
one call: under load a batch costs one candidate call, not one per request); a full queue, or a batch over `SHADOW_MAX_ROWS`, is dropped and
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


def _one_by_one(score, spec: RolloutSpec, bodies: list) -> tuple[list[dict], tuple]:
    answers, classes = [], ()
    for body in bodies:
        answer, classes = score(spec, body)
        answers.append(answer)
    return answers, classes


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
    BATCH = 64  # queued requests the thread scores in one call (the queue's backlog, up to SHADOW_MAX_ROWS rows)
    LINGER = 0.02  # seconds the thread waits for more requests once it has one: a batch costs one call
    TIME_EVERY = 10  # one batch in 10 (and every batch of one) also times one request alone: the arm's p95

    def __init__(self, score: Callable[[RolloutSpec, object], tuple[dict, tuple]], size: int, max_rows: int,
                 inline: bool = False, inline_budget_ms: float = 5.0, inline_sample: float = 0.1,
                 score_many: Callable[[RolloutSpec, list], tuple[list[dict], tuple]] | None = None):  # fmt: skip
        self.score = score  # (spec, rows) -> the candidate's answer, as /predict gives it, and its classes
        # (spec, [body, ...]) -> the candidate's answer per body, from one call, and its classes
        self.score_many = score_many or (lambda spec, bodies: _one_by_one(score, spec, bodies))
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
            self._queue.put_nowait((spec, body, answer, rows))  # type: ignore[union-attr]
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
        batches = 0
        while True:
            items = [work.get()]
            rows = items[0][3]
            time.sleep(self.LINGER)  # a sleep, not a wait on the queue: a put then wakes no thread
            while len(items) < self.BATCH and rows < self.max_rows:  # what queued meanwhile, scored at once
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                rows += item[3]
            try:
                self._score_batch(items, timed=batches % self.TIME_EVERY == 0 or len(items) == 1)
            finally:
                batches += 1
                for _ in items:
                    work.task_done()

    def _score_batch(self, items: list, timed: bool) -> None:
        """The requests of one rollout in one call; a batch that fails is scored request by request. With
        `timed`, the first is scored alone first: its time is the arm's scoring time, comparable with the
        stable version's for one request."""
        spec, body, answer, _ = items[0]
        if timed:
            self._score_one(spec, body, answer)
        rest = [item for item in items[1 if timed else 0 :] if item[0].id == spec.id]
        for other in items[1:]:
            if other[0].id != spec.id:  # a rollout that changed while they queued: rare, scored alone
                self._score_one(other[0], other[1], other[2])
        if not rest:
            return
        try:
            scored, classes = self.score_many(spec, [item[1] for item in rest])
        except Exception:  # one request the candidate cannot score: find which, and count each
            for item in rest:
                self._score_one(item[0], item[1], item[2])
            return
        agree = disagree = 0
        difference = 0.0
        labels = []
        for item, one in zip(rest, scored, strict=True):
            a, d, diff = compare(item[2], one)
            agree, disagree, difference = agree + a, disagree + d, difference + diff
            labels.extend(one["predictions"])
        rollout_metrics.record(spec.id, "shadow", "ok", None, labels, classes, requests=len(rest))
        rollout_metrics.record_shadow(spec.id, agree, disagree, difference)
