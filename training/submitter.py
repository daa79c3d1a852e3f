"""The submitter's side of a training job: create it, discard it if no executor takes it, read it, wait for it.

The submitter creates the job's run once: the request, the dataset (a built-in name, or the client's
rows stored as the run's artifact and logged as its input), status SCHEDULED. It never writes the job
again: the attempts running it do (training/attempt.py), and a supervisor records a hard kill.
Reading (`get_job`, `wait_for_job`) has no side effects.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import warnings
from typing import TYPE_CHECKING

from mlflow.entities import DatasetInput, InputTag, Run

from kernel.errors import DomainError
from kernel.registry import Registry, iso_time
from training.job_record import JobRecord, JobState, JobStatus

if TYPE_CHECKING:  # imported where the data is parsed: they import scikit-learn and pandas
    from training.datasets import Dataset
    from training.spec import TrainingSpec

log = logging.getLogger(__name__)

DATASET_ARTIFACT = "dataset/rows.json"


class QueueFull(DomainError):
    """TRAIN_MAX_QUEUED jobs are already waiting (429, try again later)."""

    status = 429
    code = "too_many_jobs"
    headers = {"Retry-After": "30"}

    def client_message(self) -> str:
        return f"{self}; try again later."


class ExecutorUnavailable(DomainError):
    """The job could not be handed to any worker (the broker is unreachable); it was discarded (503)."""

    status = 503
    code = "training_unavailable"
    headers = {"Retry-After": "30"}
    log_level = logging.ERROR

    def __init__(
        self, detail: str, client_message: str = "The training process could not be started; nothing was trained."
    ):
        super().__init__(detail)
        self._client_message = client_message

    def client_message(self) -> str:
        return self._client_message


def _dataset_payload(dataset: Dataset) -> str:
    """The validated rows as JSON (never pickle), in the form `attempt.load_job_dataset` reads back."""
    frame = dataset.features.astype(object).where(dataset.features.notna(), None)
    return json.dumps(
        {"columns": list(frame.columns), "rows": frame.values.tolist(), "labels": dataset.labels.tolist()}
    )


def _attach_dataset(registry: Registry, dataset: Dataset, run: Run) -> None:
    """The client's rows as the run's artifact, and as its input: the MLflow UI shows name, digest and schema."""
    import mlflow.data

    registry.log_run_text(run.info.run_id, _dataset_payload(dataset), DATASET_ARTIFACT)
    target = "target" if "target" not in dataset.features.columns else "target_"
    frame = dataset.features.assign(**{target: dataset.labels.values})
    source = f"{run.info.artifact_uri.rstrip('/')}/{DATASET_ARTIFACT}"
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is the run's artifact either way
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(
                frame, source=source, name=dataset.name, digest=dataset.digest, targets=target
            )
    except Exception:  # a source scheme MLflow cannot resolve here: the artifact path is still in the tags
        data = mlflow.data.from_pandas(frame, name=dataset.name, digest=dataset.digest)
    context = InputTag(key="mlflow.data.context", value="training")
    registry.log_run_inputs(run.info.run_id, [DatasetInput(data._to_mlflow_entity(), tags=[context])])


def create_job(
    registry: Registry, spec: TrainingSpec, dataset: str | Dataset, max_queued: int, queue: str | None = None
) -> str:
    """Record a new job (SCHEDULED) with its request and its dataset; returns the job id (its run id).

    `queue`: where it is sent (a Celery queue, or "local"); a keeper sends again only its own queue's jobs.
    Raises QueueFull when `max_queued` jobs already wait.
    """
    if JobRecord.count_waiting(registry, max_queued) >= max_queued:
        raise QueueFull(f"{max_queued} training jobs are already waiting")
    name = dataset if isinstance(dataset, str) else dataset.name
    if isinstance(dataset, str):
        reference, attach = {"builtin": name}, None
    else:
        reference = {"artifact": DATASET_ARTIFACT, "name": name, "source": dataset.source, "digest": dataset.digest,
                     **({"details": dataset.details} if dataset.details else {})}  # fmt: skip
        attach = functools.partial(_attach_dataset, registry, dataset)
    request = {"estimator": spec.estimator, "params": spec.params, "model_name": spec.model_name,
               "activate": spec.activate, "dataset": name}  # fmt: skip
    record = JobRecord.create(registry, request, reference, run_name=f"{name}-{spec.estimator}",
                              tags={"estimator": spec.estimator, "dataset": name,
                                    **({"job.queue": queue} if queue else {})}, attach=attach)  # fmt: skip
    return record.job_id


def mark_sent(registry: Registry, job_id: str) -> None:
    """The job is in the executor's hands: a keeper sends again only a job never marked so (training/job_keeper.py).
    Never fails the request: the job is queued already, and a keeper reading it unsent sends it once more."""
    try:
        JobRecord(registry, job_id).sent()
    except Exception as exc:
        log.warning("could not mark job %s sent: %s", job_id, exc)


def discard_job(registry: Registry, job_id: str) -> None:
    """Undo `create_job` for a job that could not be handed to any executor (nobody will ever run it)."""
    JobRecord(registry, job_id).discard()


# ---- reading: no side effects ------------------------------------------------------------------------
def _seconds(later: float | None, earlier: float | None) -> float | None:
    return round(later - earlier, 3) if later is not None and earlier is not None else None


def _iso(seconds: float | None) -> str | None:
    return iso_time(int(seconds * 1000)) if seconds is not None else None


def get_job(registry: Registry, job_id: str) -> dict:
    """The job as its record says: status, phase, attempt, how long it waited and ran, its result or error."""
    return describe_job(JobRecord.lookup(registry, job_id))


def describe_job(state: JobState, now: float | None = None) -> dict:
    """What `GET /train/jobs/<id>` answers for the job's record."""
    now = time.time() if now is None else now
    job = {"job_id": state.job_id, "status": state.status.value, "estimator": state.request.get("estimator"),
           "params": state.request.get("params"), "dataset": state.request.get("dataset"),
           "created_at": iso_time(state.created_at_ms), "location": f"/train/jobs/{state.job_id}"}  # fmt: skip
    if state.status == JobStatus.QUEUED:
        job["waited_seconds"] = _seconds(now, state.created_at)
        return job
    job.update(attempt=state.attempt or 1, worker=state.worker,
               waited_seconds=_seconds(state.started_at, state.created_at), started_at=_iso(state.started_at))  # fmt: skip
    if state.status == JobStatus.RUNNING:
        job["phase"] = state.phase
        job["phase_elapsed_seconds"] = _seconds(now, state.phase_started_at or now)
        job["elapsed_seconds"] = _seconds(now, state.started_at)
        age = state.heartbeat_age(now)
        job["heartbeat_age_seconds"] = round(age, 3) if age is not None else None
    else:
        job["finished_at"] = _iso(state.finished_at)
        job["elapsed_seconds"] = _seconds(state.finished_at, state.started_at)
    if state.phases:
        job["phases"] = state.phases  # seconds of each phase this attempt ended
    if state.lost is not None:
        job["lost_attempt"] = state.lost
    if state.status == JobStatus.SUCCEEDED:
        job["result"] = {"model": state.model.as_dict(), "run_id": state.job_id, "metrics": state.metrics,
                         "activated": state.activated,
                         **({"not_activated": state.not_activated} if state.not_activated else {})}  # fmt: skip
    if state.status == JobStatus.FAILED:
        job["error"] = state.error or "unknown error"
    return job


def wait_for_job(registry: Registry, job_id: str, timeout: float) -> dict:
    """Poll the job until it finishes or `timeout` passes; returns its last state."""
    deadline = time.monotonic() + timeout
    started, delay = time.monotonic(), 0.05
    while True:
        job = get_job(registry, job_id)
        if JobStatus(job["status"]).finished or time.monotonic() > deadline:
            return job
        time.sleep(delay)
        # One run read each: every 0.1 s for a small job's first 10 s, then every 0.25 s (4 reads a second per wait).
        delay = min(delay * 1.5, 0.1 if time.monotonic() - started < 10 else 0.25)
