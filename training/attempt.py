"""One attempt at a training job, wherever it runs: the same `execute_job` in a Celery worker's process
(training/celery_executor.py) or in a local job's process on this machine (training/job_process.py).

The attempt writes its own transitions in the job's record (training/job_record.py): it starts, beats,
moves through its phases, then succeeds or fails. It stops without writing more as soon as another
attempt owns the job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from enum import StrEnum
from typing import TYPE_CHECKING

from kernel.config import Settings
from kernel.logs import configure_logging
from kernel.registry import ModelRef, Registry
from training.job_record import JobRecord, JobState, JobStatus, time_limit_error

if TYPE_CHECKING:  # imported where a job runs: they import scikit-learn, which a serving process does not need
    from training.datasets import Dataset

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
# A running attempt not heard from for this long is lost: another may take the job over. It also bounds how
# long an attempt goes on without the tracking server, where it can record nothing.
LEASE_SECONDS = 30.0


class AttemptOutcome(StrEnum):
    """How one attempt ended: not the job's status (a job is queued, running, succeeded or failed)."""

    SUCCEEDED = "succeeded"  # it registered the version and recorded the job succeeded
    FAILED = "failed"  # it recorded the job failed (its own error, or no attempts left)
    SKIPPED = "skipped"  # the job had already finished (a message delivered twice): nothing written
    BUSY = "busy"  # another attempt was heard from within the lease: the job is left to it, nothing written
    SUPERSEDED = "superseded"  # another attempt took the job over meanwhile: this one stopped, recording nothing

    @property
    def job_finished(self) -> bool:
        """The job's record is final after this attempt: nothing is left to run."""
        return self in (AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.SKIPPED)


class Superseded(Exception):
    """Another attempt has taken the job over: this one records nothing more."""


def hard_time_limit(seconds: int) -> int:
    """The limit at which the job's process is killed: the soft limit plus time to record the failure."""
    return seconds + max(10, seconds // 10)


def _abandon(job_id: str) -> None:
    """The attempt lost the tracking server for a whole lease: end its process, as a killed one would end.

    The executor then treats it as lost (Celery hands the job back to the broker; the local executor's
    sweeper starts it again), and the next attempt, once the tracking server answers, records this one.
    """
    log.error("job %s: the tracking server was unreachable for %.0f s; abandoning this attempt", job_id, LEASE_SECONDS)
    logging.shutdown()
    os._exit(75)


class Heartbeat:
    """The running attempt's pulse, from its own thread: `beat` in the job's record every HEARTBEAT_SECONDS.

    Each beat also reads who owns the job: once the record names another attempt, `superseded` is
    set and the job stops at its next phase. A beat that cannot reach the tracking server counts
    against the lease; a whole lease without one calls `on_lost_contact`.
    """

    def __init__(self, record: JobRecord, attempt_id: str, on_lost_contact=_abandon):
        self.record, self.attempt_id, self.on_lost_contact = record, attempt_id, on_lost_contact
        self.superseded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{record.job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS + 10)

    def _run(self) -> None:
        job_id = self.record.job_id
        heard = time.monotonic()
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                owner = self.record.read().attempt_id
                if owner != self.attempt_id:
                    log.warning("job %s: attempt %s was superseded by %s", job_id, self.attempt_id, owner)
                    self.superseded.set()
                    return
                self.record.beat()
                heard = time.monotonic()
            except Exception as exc:
                log.warning("job %s: heartbeat failed: %s", job_id, exc)
                if time.monotonic() - heard >= LEASE_SECONDS and not self._stop.is_set():
                    self.on_lost_contact(job_id)
                    return

    def check(self) -> None:
        """Raise Superseded if another attempt owns the job now (read afresh, not only the last beat)."""
        if self.superseded.is_set():
            raise Superseded(self.record.job_id)
        if self.record.read().attempt_id != self.attempt_id:
            self.superseded.set()
            raise Superseded(self.record.job_id)


def execute_job(
    registry: Registry,
    job_id: str,
    max_attempts: int,
    worker: str,
    time_limit: int,
    previous_lost: bool = False,
    on_lost_contact=_abandon,
) -> AttemptOutcome:
    """Run one attempt of a job, wherever it runs; returns how the attempt ended.

    A job already finished (a message delivered twice) is left alone (SKIPPED). A job whose attempt
    is still running and was heard from within LEASE_SECONDS is left to it (BUSY: a broker
    redelivered the message while its first taker still works); `previous_lost` says the caller
    knows that attempt's process is gone. Otherwise an earlier attempt that never finished is lost:
    it is recorded and whatever it registered removed; then the job runs again, or fails once
    `max_attempts` were used. While it runs, the attempt beats (`Heartbeat`), and it stops without
    writing more as soon as another attempt owns the job (SUPERSEDED).
    """
    mlflow_setup(registry)
    record = JobRecord(registry, job_id)
    state = record.read()
    if state.status.finished:
        log.warning("job %s already %s; not running it again", job_id, state.status)
        return AttemptOutcome.SKIPPED
    if state.status == JobStatus.RUNNING and not previous_lost:
        age = state.heartbeat_age()
        if age is not None and age < LEASE_SECONDS:
            log.warning("job %s: attempt %s on %s was heard from %.1f s ago; leaving the job to it", job_id,
                        state.attempt, state.worker, age)  # fmt: skip
            return AttemptOutcome.BUSY
    attempt, lost = state.attempt + 1, None
    if attempt > 1:
        lost = f"Attempt {attempt - 1} on {state.worker or 'a worker'} was lost: its process ended without reporting (killed or crashed)."
        record.remove_versions()
        if attempt > max_attempts:
            record.fail(f"{lost} No attempts left (TRAIN_MAX_ATTEMPTS={max_attempts}).")
            return AttemptOutcome.FAILED
    attempt_id = record.start(attempt, worker, os.getpid(), lost=lost)
    log.info("job %s: attempt %d starts on %s", job_id, attempt, worker)
    heartbeat = Heartbeat(record, attempt_id, on_lost_contact).start()
    return _train_and_record(record, state, heartbeat, attempt, time_limit)


def _train_and_record(
    record: JobRecord, state: JobState, heartbeat: Heartbeat, attempt: int, time_limit: int
) -> AttemptOutcome:
    """Train, then record the outcome, unless another attempt owns the job by then."""
    from training.run import run_training
    from training.spec import TrainingSpec

    def on_phase(phase: str) -> None:
        heartbeat.check()
        record.phase(phase)

    request, reference, job_id = state.request, state.dataset, record.job_id
    registered: list[ModelRef] = []  # what this attempt registered: withdrawn if it is taken over later
    spec = TrainingSpec(request["estimator"], request["params"], request["model_name"], request["activate"])
    try:
        dataset = load_job_dataset(record.registry, job_id, reference)
        result = run_training(record.registry, spec, dataset, run_id=job_id, on_phase=on_phase,
                              log_dataset="builtin" in reference, before_activate=record.remember_previous_active,
                              on_registered=registered.append)  # fmt: skip
        heartbeat.stop()
        heartbeat.check()
    except Exception as exc:
        heartbeat.stop()
        try:
            if not isinstance(exc, Superseded):
                heartbeat.check()  # a failure is recorded only by the attempt that still owns the job
        except Superseded:
            exc = Superseded(job_id)
        if isinstance(exc, Superseded):
            for ref in registered:  # taken over after registering (even while plotting): its version goes
                record.withdraw(ref)
            log.warning("job %s: another attempt owns it now; attempt %s stops and records nothing", job_id, attempt)
            return AttemptOutcome.SUPERSEDED
        if is_time_limit(exc):
            record.fail(time_limit_error(time_limit))
        else:
            log.exception("job %s failed", job_id)
            record.fail(f"{type(exc).__name__}: {exc}")
        return AttemptOutcome.FAILED
    record.succeed(activated=result["activated"], not_activated=result.get("not_activated"))
    log.info("job %s: attempt %d succeeded", job_id, attempt)
    return AttemptOutcome.SUCCEEDED


def load_job_dataset(registry: Registry, job_id: str, reference: dict) -> Dataset:
    """The job's data: a built-in dataset by name, or the client's rows from the run's artifacts."""
    import json

    import pandas as pd

    from training.datasets import Dataset, load_builtin, typed_features

    if "builtin" in reference:
        return load_builtin(reference["builtin"])

    payload = json.loads(registry.load_run_text(job_id, reference["artifact"]))
    features = typed_features(pd.DataFrame(payload["rows"], columns=payload["columns"]))
    labels = pd.Series(payload["labels"], name="target")
    return Dataset(reference["name"], features, labels, reference["source"], reference["digest"],
                   reference.get("details", {}))  # fmt: skip


def is_time_limit(exc: BaseException) -> bool:
    """The soft time limit, raised here or inside a library that wrapped it (MLflow re-raises it as its own)."""
    from billiard.exceptions import SoftTimeLimitExceeded

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SoftTimeLimitExceeded):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def preload_training() -> None:
    """Import what every job uses, once, in a process that runs jobs (a Celery worker, a local job's process).

    Each attempt's process is forked from it and starts warm, and an attempt's time limit counts its
    training, not seconds of imports. A serving process never calls this: it does not need scikit-learn.
    Once per process tree: a job's process forked from the warm fork server has nothing left to do (the
    warm-up again cost each job 0.1-0.2 s of its wait).
    """
    global _preloaded
    if _preloaded:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow.models.utils  # noqa: F401 - log_model checks the input example through pyfunc
    import mlflow.pyfunc  # noqa: F401
    import mlflow.pyfunc.scoring_server  # noqa: F401 - ... and its serving input
    import mlflow.sklearn  # noqa: F401
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401 - the registry an attempt opens first
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import onnxruntime  # noqa: F401
    import skl2onnx  # noqa: F401
    import skops.io  # noqa: F401

    import kernel.metrics  # noqa: F401 - a finished job counts itself
    import training.compile  # noqa: F401
    import training.datasets  # noqa: F401
    import training.plots  # noqa: F401
    import training.run  # noqa: F401

    with contextlib.suppress(ImportError):  # MLflow tags a run with its source's git commit, through GitPython
        import git  # noqa: F401

    _warm_up()
    # The jobs' processes fork from this heap: the collector never scans it again. Celery's pool collects before
    # each fork (celery/celery#2927), which took 0.24 s a job over these objects; and a forked process that
    # collects no longer writes to the pages it shares with this one.
    gc.collect()
    gc.freeze()
    _preloaded = True


_preloaded = False  # inherited by forked children: set in the fork server and a Celery worker's parent


def _warm_up() -> None:
    """One small model through the whole path, in a temporary folder: what a job's first `log_model`, ONNX
    conversion and check would otherwise import and build lazily (seconds) is done once, before any job."""
    import tempfile

    import mlflow.pyfunc
    import mlflow.sklearn

    from kernel.trusted_types import TRUSTED_TYPES
    from training.compile import compile_pipeline
    from training.datasets import load_builtin
    from training.pipeline import build_pipeline

    try:
        dataset = load_builtin("iris")
        model = build_pipeline(dataset.features, "LogisticRegression", {}).fit(dataset.features, dataset.labels)
        compile_pipeline(model, dataset.features, dataset.features.head(10))
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/model"
            mlflow.sklearn.save_model(model, path, serialization_format="skops", skops_trusted_types=TRUSTED_TYPES,
                                      input_example=dataset.features.head(3), pip_requirements=[])  # fmt: skip
            mlflow.pyfunc.load_model(path).predict(dataset.features.head(3))
    except Exception:  # a warm-up must never stop a worker: its first job pays instead
        log.exception("warming up the training path failed")


def mlflow_setup(registry: Registry) -> None:
    """Point MLflow's fluent API (the run's logging, registering) at the job's tracking server."""
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def configure_job_logging(settings: Settings) -> None:
    """A process that runs jobs logs in the service's format, secrets redacted (`kernel.logs.set_job_id` then
    puts a job's id on every line)."""
    secrets = tuple(t.get_secret_value() for t in (settings.API_TOKEN, settings.PREDICT_TOKEN) if t is not None)
    configure_logging(settings.LOG_FORMAT, settings.LOG_LEVEL, secrets=secrets)
