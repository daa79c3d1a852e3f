"""Drift: do the served inputs and predicted classes still look like the version's training rows?

This module counts: each process's rows per served version, queued and counted after the answers, in time
slots every worker can merge. The distances and levels are `serving/drift_figures.py`'s.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections import deque

import numpy as np

from serving.drift_counts import VersionCounts, counts_key, merged, row_cells, small_cells
from serving.drift_figures import report

SMALL_BATCH = 32  # up to this many rows, a version's queued requests are counted together at a flush
FLUSH_SECONDS = 0.2  # how often each process counts the requests it answered since the last flush
MAX_QUEUED = 5_000  # requests queued beyond this are counted by the request that finds them (memory stays bounded)


class DriftMonitor:
    """This process's drift counts per served version, and the merged view every worker can give."""

    def __init__(self, settings):
        self.enabled = settings.DRIFT_ENABLED
        self.window = settings.DRIFT_WINDOW_SECONDS
        self.slot_seconds = self.window / 60
        self.max_rows = settings.DRIFT_MAX_ROWS_PER_REQUEST
        self.min_rows = settings.DRIFT_MIN_ROWS
        self.limits = (settings.DRIFT_PSI_WARN, settings.DRIFT_PSI_ALERT)
        self.folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._counts: dict[tuple, VersionCounts] = {}  # (baseline sha256, name, version, pid)
        self._lock = threading.Lock()
        self._queued: deque = deque()  # (model, columns, labels) of small requests not counted yet
        self._flush_lock = threading.Lock()
        self._flusher_pid = 0
        # On Lambda (one process per environment) the counts also go to CloudWatch as EMF lines.
        self.emitter = None
        if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and not self.folder:
            from serving.drift_emf import Emitter

            self.emitter = Emitter(self)

    @property
    def scope(self) -> str:
        return "instance" if self.folder else "process"

    def _for(self, model) -> VersionCounts:
        key = (model.baseline.sha256, model.ref.name, model.ref.version, os.getpid())  # a fork: its own file
        counts = self._counts.get(key)
        if counts is None:
            with self._lock:
                counts = self._counts.get(key)
                if counts is None:
                    name = counts_key(model.baseline, model.ref.name, model.ref.version)
                    counts = self._counts[key] = VersionCounts(model.baseline, self.slot_seconds, self.folder, name)
        return counts

    def observe(self, model, columns: dict, labels: list) -> None:
        """Count one answered request's rows against the version's baseline (no baseline: nothing to count).

        The request is only queued: this process's flusher counts the queue every FLUSH_SECONDS, after the answers
        have gone. Small requests (up to SMALL_BATCH rows) of a version are counted together, in one numpy pass,
        for a fraction of what counting each in Python cost (17 µs of a one-row request's CPU under load, 5 % of
        it); a larger one alone, at most `max_rows` of it. Readers in this process flush first; other workers'
        last FLUSH_SECONDS show at their next flush, and a SIGKILL loses them."""
        baseline = model.baseline
        if not self.enabled or baseline is None:
            return
        if self.emitter is None:
            if self._flusher_pid != os.getpid():
                self._start_flusher()
            self._queued.append((model, columns, labels))
            if len(self._queued) > MAX_QUEUED:  # a flood between two flushes: this request counts the queue
                self.flush()
            return
        # Lambda: an environment is frozen between invocations, so nothing waits for a flusher.
        if len(labels) > SMALL_BATCH:
            self._for(model).add(*row_cells(baseline, columns, labels, self.max_rows))
        else:
            self._for(model).add(small_cells(baseline, columns, labels), len(labels))
        self.emitter.maybe_emit([model])

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher_pid == os.getpid():
                return
            self._queued, self._flush_lock = deque(), threading.Lock()  # nothing of a parent's (a fork)
            threading.Thread(target=self._flush_every, args=(self._queued,), name="drift-flush", daemon=True).start()
            if not self._flusher_pid:
                atexit.register(self.flush)  # a graceful stop counts what is queued
            self._flusher_pid = os.getpid()

    def _flush_every(self, queued: deque) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            if queued is not self._queued:  # a fork replaced the queue: this thread was the parent's
                return
            self.flush()

    def flush(self) -> None:
        """Count the queued requests: a large one alone (sampled); the small ones per version, their rows' columns
        joined, in one row_cells."""
        if self._flusher_pid != os.getpid():
            return
        with self._flush_lock:
            queued, groups = self._queued, {}
            while queued:
                model, columns, labels = queued.popleft()
                if len(labels) > SMALL_BATCH:  # sampled on its own: at most max_rows of each request
                    self._for(model).add(*row_cells(model.baseline, columns, labels, self.max_rows))
                else:
                    groups.setdefault(id(model), (model, []))[1].append((columns, labels))
            for model, requests in groups.values():
                joined: dict[str, list] = {}
                labels: list = []
                for columns, answered in requests:
                    for cells in model.baseline.features:
                        joined.setdefault(cells.name, []).extend(columns[cells.name])
                    labels.extend(answered)
                self._for(model).add(*row_cells(model.baseline, joined, labels, len(labels)))

    def version_counts(self, model, window: int, route: str = "stable") -> tuple[dict, int, np.ndarray | None]:
        """A served version's /drift entry, with the merged rows and cell counts it was computed from."""
        entry = {"name": model.ref.name, "version": model.ref.version, "route": route}
        if model.baseline is None:
            return {**entry, "rows": 0, "status": "no_baseline", "reason": model.baseline_reason}, 0, None
        baseline = model.baseline
        self.flush()  # this process's queued rows count in what it answers
        local = self._counts.get((baseline.sha256, model.ref.name, model.ref.version, os.getpid()))
        key = counts_key(baseline, model.ref.name, model.ref.version)
        rows, live = merged(baseline, window, self.slot_seconds, self.folder, local, key=key)
        return {**entry, **report(baseline, rows, live, self.min_rows, *self.limits)}, rows, live

    def version_report(self, model, window: int, route: str = "stable") -> dict:
        return self.version_counts(model, window, route)[0]


if __name__ == "__main__":  # python -m serving.drift report ... (serving/drift_report.py)
    import sys

    from serving.drift_report import main

    sys.exit(main())
