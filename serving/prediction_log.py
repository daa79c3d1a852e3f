"""The prediction log: every answered row gets an id, and is recorded off the request path.

A request adds its rows to this process's bounded queue and returns; a writer thread inserts them in
batches (every `PREDICTION_LOG_FLUSH_SECONDS`, or sooner past `BATCH_ROWS`). Nothing here can fail or
slow a prediction: a full queue, or a database that is down or full, drops rows and counts them
(`prediction_log_dropped_total{reason}`), and `/health` says the log is degraded, and why. A graceful
stop flushes the queue (atexit); a SIGKILL loses at most one flush interval's rows.

Each row also says whether a value was outside its version's training range (the drift baseline's min and
max), and, only with PREDICTION_LOG_INPUTS, holds the validated feature values (less PREDICTION_LOG_EXCLUDE):
both computed by the writer, off the request path.

Ids: 16 random hex digits drawn once per process, the process's request count (10 hex digits) and the row's index
in hex: unique across workers and instances without coordination. (A draw per request, `os.urandom`, let go of the
GIL: under load the request thread then queued to take it back, 4 % of a worker's samples.)
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from prometheus_client import Counter

from kernel.config import ConfigError, Settings
from kernel.locks import KeptLock, file_lock
from serving.prediction_rows import label_texts, out_of_range_of, shared_values, table_rows

log = logging.getLogger(__name__)

BATCH_ROWS = 1_000  # rows per insert (one transaction)
WAKE_ROWS = 10_000  # pending rows that wake the writer before its tick
LARGE_ROWS = 200  # a request with this many rows is inserted as columns (JSON arrays), not rows
RETENTION_SECONDS = 600  # how often the machine's retention turn comes
LOGGED = Counter("prediction_log_rows_total", "Rows written to the prediction log")
DROPPED = Counter("prediction_log_dropped_total", "Rows the prediction log dropped, by reason", ["reason"])
for _reason in ("queue_full", "database", "unwritable"):
    DROPPED.labels(_reason)


class PredictionLog:
    """This process's queue and writer thread (started on first use, and again after a fork)."""

    def __init__(self, settings: Settings):
        self.enabled = settings.PREDICTION_LOG
        self.inputs = settings.PREDICTION_LOG_INPUTS
        self.exclude = frozenset(settings.PREDICTION_LOG_EXCLUDE)
        self.sample = settings.PREDICTION_LOG_SAMPLE
        self.capacity = settings.PREDICTION_LOG_QUEUE
        self.flush_seconds = settings.PREDICTION_LOG_FLUSH_SECONDS
        self.retention_days = settings.PREDICTION_LOG_RETENTION_DAYS
        self.retention_lock = KeptLock(Path(settings.STATE_DIR) / "prediction-log-retention.lock")
        self._next_retention = 0.0
        self.refresh_seconds = settings.PERFORMANCE_REFRESH_SECONDS
        self.window_seconds = settings.PERFORMANCE_WINDOW_HOURS * 3600
        self.state_dir = Path(settings.STATE_DIR)
        self.holdout_of: Callable[[str, str], dict] = lambda name, version: {}
        # Live figures onto each version's MLflow run: (name, version, figures, time); set by the composition root.
        self.log_live: Callable[[str, str, dict, float], None] | None = None
        self.log_seconds = settings.PERFORMANCE_LOG_SECONDS
        self.min_labels = settings.PERFORMANCE_MIN_LABELS
        self._next_refresh = self._next_log = 0.0
        self.url = ""
        self.status, self.reason = ("starting", "") if self.enabled else ("off", "PREDICTION_LOG=off")
        self._pending: deque = deque()  # (ids, request id, ...) per answered request, oldest first
        self._rows = 0  # rows waiting (approximate: updated without a lock)
        self._wake = threading.Event()
        self._stopping = False
        self._pid = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._engine, self._engine_pid = None, 0
        self._inserter = None
        self._prefix, self._requests = "", itertools.count()  # this process's (set with its writer)

    # ---- start -------------------------------------------------------------------------------------------
    def start(self, settings: Settings) -> None:
        """Create or migrate the schema once; a database that cannot be reached leaves the log degraded."""
        if not self.enabled:
            return
        try:
            from kernel.prediction_db import database_url, make_engine, migrate

            self.url = database_url(settings)
            engine = make_engine(self.url)
            with file_lock(Path(settings.STATE_DIR) / "prediction-log-migrate.lock"):
                migrate(engine)
            engine.dispose()
            self._set("ok", "")
        except ImportError as exc:  # the Lambda packages (mlflow-skinny): a clear stop, not a silent loss
            raise ConfigError(f"PREDICTION_LOG=on needs SQLAlchemy and alembic, which this stack does not install "
                              f"({exc.name}); set PREDICTION_LOG=off") from None  # fmt: skip
        except Exception as exc:
            self._set("degraded", f"the prediction log's database cannot be used: {_short(exc)}")
        atexit.register(self.flush)

    def database(self):
        """This process's engine for the log: made on first use, and again after a fork (a pool is never shared)."""
        with self._lock:
            if self._engine_pid != os.getpid():
                from kernel.prediction_db import make_engine

                self._engine, self._engine_pid = make_engine(self.url), os.getpid()
            return self._engine

    def health(self) -> dict:
        return {"status": self.status, **({"reason": self.reason} if self.reason else {})}

    # ---- the request path ----------------------------------------------------------------------------------
    def record(self, request_id: str, model, route: str, result: dict, columns: dict | None = None) -> None:
        """Give the answer its `prediction_ids`, and queue its rows (never raises, never waits).

        `columns` are the validated rows (feature -> values): the writer stores them (PREDICTION_LOG_INPUTS) and
        flags rows outside the training range; nothing of them is copied here."""
        if not self.enabled:
            return
        if self._pid != os.getpid():
            self._start_thread()
        rows = len(result["predictions"])
        prefix = f"{self._prefix}{next(self._requests):010x}"
        ids = [prefix + index for index in _hex_indices(rows)]
        result["prediction_ids"] = ids
        if self.sample < 1.0 and random.random() >= self.sample:  # noqa: S311 - a sample, not a secret
            result["prediction_logged"] = False  # these ids cannot take feedback
            return
        if self._rows + rows > self.capacity:
            DROPPED.labels("queue_full").inc(rows)
            result["prediction_logged"] = False
            return
        self._rows += rows
        if self._rows >= min(WAKE_ROWS, self.capacity // 2):
            self._wake.set()  # a large backlog: written now, not at the next tick
        item = (ids, request_id, datetime.now(UTC).replace(tzinfo=None), model.ref.name, model.ref.version, route,
                result["model"]["runtime"], result["predictions"], result.get("probabilities"),
                columns, model.baseline)  # fmt: skip
        self._pending.append(item)  # unbounded: the row count bounds it

    # ---- the writer --------------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # Nothing of the parent's is used. A deque, not a Queue: an append wakes no thread, so the writer
            # never takes the GIL from the request threads between its ticks (a Queue woke it on every request).
            self._pending, self._rows, self._wake, self._stopping = deque(), 0, threading.Event(), False
            self._prefix, self._requests = os.urandom(8).hex(), itertools.count()
            self._thread = threading.Thread(
                target=self._run, args=(self._pending, self._wake), name="prediction-log", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def _run(self, pending: deque, wake: threading.Event) -> None:
        """Every flush interval (sooner past WAKE_ROWS, or at a stop): write what is pending, in batches."""
        while True:
            wake.wait(self.flush_seconds)
            wake.clear()
            stopping = self._stopping
            batch, rows = [], 0
            while pending:
                item = pending.popleft()
                batch.append(item)
                rows += len(item[0])
                if rows >= BATCH_ROWS:
                    self._write(batch)
                    batch, rows = [], 0
            self._write(batch)
            if stopping:
                return
            self._apply_retention()
            self._refresh_performance()

    def _write(self, batch: list) -> None:
        rows_in_batch = sum(len(item[0]) for item in batch)
        self._rows -= rows_in_batch
        if not rows_in_batch:
            return
        try:
            from kernel.prediction_db import row_inserter

            engine = self.database()
            if self._inserter is None:
                self._inserter = row_inserter(engine.dialect)
            flags, nested, time_of = out_of_range_of(batch), self._inserter.NESTED, self._inserter.time
            small, large = [], []  # a large request goes in as columns (no tuple per row), the others as rows
            for item, flagged in zip(batch, flags, strict=True):
                (large if len(item[0]) >= LARGE_ROWS else small).append((item, flagged))
            rows = list(itertools.chain.from_iterable(
                table_rows(item, self._inputs(item[9], nested), flagged, time_of, nested) for item, flagged in small))  # fmt: skip
        except Exception as exc:  # never the writer's end: the batch is dropped, counted and logged
            DROPPED.labels("unwritable").inc(rows_in_batch)
            log.exception("prediction log: a batch could not be prepared: %s", _short(exc))
            return
        try:
            with engine.begin() as connection:
                self._inserter.insert(connection, rows)
                for item, flagged in large:
                    self._inserter.insert_request(connection, shared_values(item, time_of), item[0],
                                                  label_texts(item[7]), item[8], self._inputs(item[9], True), flagged)  # fmt: skip
            LOGGED.inc(rows_in_batch)
            if self.status != "ok":
                self._set("ok", "")
        except Exception as exc:  # down, full, locked: drop, count, say so; the next batch tries again
            DROPPED.labels("database").inc(rows_in_batch)
            self._set("degraded", f"writing to the prediction log failed: {_short(exc)}")

    def _apply_retention(self) -> None:
        """At most every RETENTION_SECONDS, in the one process of the machine holding the lock: old rows go."""
        if time.monotonic() < self._next_retention or self.status != "ok":
            return
        self._next_retention = time.monotonic() + RETENTION_SECONDS
        if not self.retention_lock.held():
            return
        from kernel.prediction_db import delete_older_than

        cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=self.retention_days)
        try:
            deleted = delete_older_than(self.database(), cutoff)
            if deleted:
                log.info("prediction log: deleted %d rows older than %d days", deleted, self.retention_days)
        except Exception as exc:  # the next turn tries again
            log.warning("prediction log: retention failed: %s", _short(exc))

    def _refresh_performance(self) -> None:
        """At most every `refresh_seconds`, in the process holding the machine's lock: live accuracy per version
        into the snapshot `/metrics` reads (serving/live_performance.py)."""
        if time.monotonic() < self._next_refresh or self.status != "ok":
            return
        self._next_refresh = time.monotonic() + self.refresh_seconds
        if not self.retention_lock.held():
            return
        from serving.live_performance import compute, write_snapshot

        try:
            versions = compute(self.database(), self.window_seconds, self.holdout_of)
            write_snapshot(self.state_dir, versions)
        except Exception as exc:  # the next turn tries again
            log.warning("prediction log: live accuracy failed: %s", _short(exc))
            return
        if self.log_live is not None and time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + self.log_seconds
            self._log_to_mlflow(versions)

    def _log_to_mlflow(self, versions: list[dict]) -> None:
        """`live_accuracy`, `live_f1_macro` and `labelled_rows` on each version's training run, now as the step."""
        now = time.time()
        for entry in versions:
            if entry["labelled_rows"] < self.min_labels:  # a figure of a few labels is noise, not accuracy
                continue
            figures = {"live_accuracy": entry["accuracy"], "live_f1_macro": entry["f1_macro"],
                       "labelled_rows": entry["labelled_rows"]}  # fmt: skip
            try:
                self.log_live(entry["model"], entry["version"], figures, now)  # type: ignore[misc]
            except Exception as exc:  # MLflow away, or the version deleted: the next turn tries again
                log.warning("prediction log: live accuracy of %s version %s not logged to MLflow: %s",
                            entry["model"], entry["version"], _short(exc))  # fmt: skip
                return  # the rest waits for the next turn: the writer is not held by an unreachable server

    def flush(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer (at exit: a graceful stop loses nothing)."""
        thread = self._thread
        if self._pid != os.getpid() or thread is None or not thread.is_alive():
            return
        self._stopping = True
        self._wake.set()
        thread.join(timeout)
        self._pid = 0  # a later record starts a new writer

    def _set(self, status: str, reason: str) -> None:
        if status != self.status or reason != self.reason:
            (log.info if status == "ok" else log.warning)(
                "prediction log: %s%s", status, f" ({reason})" if reason else ""
            )
        self.status, self.reason = status, reason

    def _inputs(self, columns: dict | None, nested: bool = False) -> list | None:
        """Each row's stored inputs (JSON text, or the objects with `nested`), when PREDICTION_LOG_INPUTS is on,
        without the excluded features."""
        if not self.inputs or not columns:
            return None
        kept = [name for name in columns if name not in self.exclude]
        objects = [dict(zip(kept, values)) for values in zip(*(columns[name] for name in kept))]
        if nested:
            return objects  # the inserter writes them as the text below would be (orjson, `default=str`)
        return [orjson.dumps(row, default=str).decode() for row in objects]


_HEX: list[str] = []


def _hex_indices(rows: int) -> list[str]:
    """The row indices 0..rows-1 in hex, made once (a 10,000-row answer's ids are then joins, not formats). A
    longer list replaces the old one whole, so a request thread never reads one half made."""
    global _HEX
    known = _HEX
    if len(known) < rows:
        known = [f"{index:x}" for index in range(max(rows, 2 * len(known), 64))]
        _HEX = known
    return known[:rows]


def _short(exc: Exception) -> str:
    """The error's first line (drivers do not put the password in it)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
