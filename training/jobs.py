"""Training jobs: a job is an MLflow run, and only the code running it writes its record.

The submitter creates the run once: the request, the dataset (a built-in name, or the client's rows
stored as the run's artifact and logged as its input), status SCHEDULED. From then on the job alone
writes its record (`job.*` tags: status, phase, attempt, worker, timestamps, error) in the run, so
`GET /train/jobs/<id>` reads the same from every worker and every instance, and never writes.
Where the job runs is the executor's business: the same `execute_job` runs in a Celery worker
(training/celery_app.py) or in this machine's local worker (training/worker.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from typing import TYPE_CHECKING

from mlflow.entities import DatasetInput, InputTag, RunStatus, RunTag

from kernel.errors import DomainError
from kernel.registry import ModelNotFound, ModelRef, Registry, iso_time, translate_errors

if TYPE_CHECKING:  # imported where a job runs: they import scikit-learn, which a serving process does not need
    from training.datasets import Dataset
    from training.job import TrainingSpec

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed")
KIND_TAG = "job.kind"
DATASET_ARTIFACT = "dataset/rows.json"


class JobNotFound(DomainError):
    """No training job with that id (404)."""

    status = 404
    code = "job_not_found"

    def client_message(self) -> str:
        return f"No training job {str(self)!r}."


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


# ---- the submitter: creates the job, then never writes to it again ----------------------------------
@translate_errors
def count_queued(registry: Registry, limit: int) -> int:
    """How many jobs wait for a worker (up to `limit`): runs still SCHEDULED."""
    runs = registry.client.search_runs(
        [registry.get_experiment_id()],
        filter_string=f"tags.`{KIND_TAG}` = 'training' and attributes.status = 'SCHEDULED'",
        max_results=limit,
    )
    return len(runs)


def _dataset_payload(dataset: Dataset) -> str:
    """The validated rows as JSON (never pickle), in the form `load_job_dataset` reads back."""
    frame = dataset.features.astype(object).where(dataset.features.notna(), None)
    return json.dumps(
        {"columns": list(frame.columns), "rows": frame.values.tolist(), "labels": dataset.labels.tolist()}
    )


def _log_dataset_input(registry: Registry, run, dataset: Dataset) -> None:
    """The client's data as the run's input: the MLflow UI shows its name, digest and schema."""
    import mlflow.data

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
    registry.client.log_inputs(run.info.run_id, datasets=[DatasetInput(data._to_mlflow_entity(), tags=[context])])


@translate_errors
def create_job(registry: Registry, spec: TrainingSpec, dataset: str | Dataset, max_queued: int) -> str:
    """Record a new job (SCHEDULED) with its request and its dataset; returns the job id (its run id).

    Raises QueueFull when `max_queued` jobs already wait.
    """
    if count_queued(registry, max_queued) >= max_queued:
        raise QueueFull(f"{max_queued} training jobs are already waiting")
    client = registry.client
    name = dataset if isinstance(dataset, str) else dataset.name
    if isinstance(dataset, str):
        reference = {"builtin": name}
    else:
        reference = {"artifact": DATASET_ARTIFACT, "name": name, "source": dataset.source, "digest": dataset.digest}
    request = {"estimator": spec.estimator, "params": spec.params, "model_name": spec.model_name,
               "activate": spec.activate, "dataset": name}  # fmt: skip
    tags = {KIND_TAG: "training", "job.request": json.dumps(request), "job.dataset": json.dumps(reference),
            "job.created_at": repr(time.time()), "estimator": spec.estimator, "dataset": name}  # fmt: skip
    run = client.create_run(registry.get_experiment_id(), tags=tags, run_name=f"{name}-{spec.estimator}")
    try:
        if not isinstance(dataset, str):
            client.log_text(run.info.run_id, _dataset_payload(dataset), DATASET_ARTIFACT)
            _log_dataset_input(registry, run, dataset)
        client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.SCHEDULED))
    except Exception:
        discard_job(registry, run.info.run_id)
        raise
    return run.info.run_id


def discard_job(registry: Registry, job_id: str) -> None:
    """Undo `create_job` for a job that could not be handed to any executor (nobody will ever run it)."""
    try:
        registry.client.delete_run(job_id)
    except Exception:
        log.warning("could not delete the run of unsent job %s", job_id)


# ---- the job itself: the one writer of its record ------------------------------------------------------
def mark_job(registry: Registry, job_id: str, status: str | None = None, **details) -> None:
    """Write the job's record (tags), and the run's MLflow status as the UI shows it."""
    tags = {f"job.{key}": str(value)[:5000] for key, value in details.items()}
    if status:
        tags["job.status"] = status
    registry.client.log_batch(job_id, tags=[RunTag(key, value) for key, value in tags.items()])
    if status == "running":
        registry.client.update_run(job_id, status="RUNNING")
    elif status in FINAL:
        registry.client.set_terminated(job_id, "FINISHED" if status == "succeeded" else "FAILED")
        _count(status)


def _count(outcome: str) -> None:
    """training_jobs_total{outcome}: shared with the API's /metrics where the job runs beside it."""
    try:
        from kernel.metrics import count_training_job

        count_training_job(outcome)
    except Exception:  # a metric must never fail a job
        log.exception("could not count the training job")


def remove_versions_of(registry: Registry, job_id: str) -> None:
    """A failed (or lost) attempt registers nothing: delete what it registered, hand the active model back."""
    refs = {ModelRef(mv.name, str(mv.version)) for mv in registry.client.search_model_versions(f"run_id = '{job_id}'")}
    _remove_versions(registry, job_id, refs)


def _withdraw(registry: Registry, job_id: str, ref: ModelRef) -> None:
    """Remove the one version a superseded attempt registered, handing the active model back if it had it."""
    _remove_versions(registry, job_id, {ref})


def _remove_versions(registry: Registry, job_id: str, refs: set[ModelRef]) -> None:
    if not refs:
        return
    previous = registry.client.get_run(job_id).data.tags.get("job.previous_active")
    if registry.get_active_model() in refs and previous:
        registry.set_active_model(ModelRef(**json.loads(previous)))
    for ref in refs:
        log.warning("removing %s version %s of job %s", ref.name, ref.version, job_id)
        registry.client.delete_model_version(ref.name, ref.version)


def fail_job(registry: Registry, job_id: str, error: str) -> None:
    """Record the job failed, after removing any version it registered."""
    remove_versions_of(registry, job_id)
    mark_job(registry, job_id, "failed", error=error, finished_at=repr(time.time()))


def hard_time_limit(seconds: int) -> int:
    """The limit at which the job's process is killed: the soft limit plus time to record the failure."""
    return seconds + max(10, seconds // 10)


def time_limit_error(seconds: int) -> str:
    return f"The job exceeded its time limit of {seconds} seconds and was stopped; nothing was registered."


def load_job_dataset(registry: Registry, job_id: str, reference: dict) -> Dataset:
    """The job's data: a built-in dataset by name, or the client's rows from the run's artifacts."""
    import mlflow.artifacts
    import pandas as pd

    from training.datasets import Dataset, _typed_features, load_builtin

    if "builtin" in reference:
        return load_builtin(reference["builtin"])

    text = mlflow.artifacts.load_text(f"runs:/{job_id}/{reference['artifact']}")
    payload = json.loads(text)
    features = _typed_features(pd.DataFrame(payload["rows"], columns=payload["columns"]))
    labels = pd.Series(payload["labels"], name="target")
    return Dataset(reference["name"], features, labels, reference["source"], reference["digest"])


HEARTBEAT_SECONDS = 5.0
# A running attempt not heard from for this long is lost: another may take the job over. It also bounds how
# long an attempt goes on without the tracking server, where it can record nothing.
LEASE_SECONDS = 30.0


class Superseded(Exception):
    """Another attempt has taken the job over: this one records nothing more."""


def _abandon(job_id: str) -> None:
    """The attempt lost the tracking server for a whole lease: end its process, as a killed one would end.

    The executor then treats it as lost (Celery hands the job back to the broker; the local executor's
    sweeper starts it again), and the next attempt, once the tracking server answers, records this one.
    """
    log.error("job %s: the tracking server was unreachable for %.0f s; abandoning this attempt", job_id, LEASE_SECONDS)
    logging.shutdown()
    os._exit(75)


class Heartbeat:
    """The running attempt's pulse, from its own thread: `job.heartbeat_at` every HEARTBEAT_SECONDS.

    Each beat also reads who owns the job: once `job.attempt_id` names another attempt, `superseded`
    is set and the job stops at its next phase. A beat that cannot reach the tracking server counts
    against the lease; a whole lease without one calls `on_lost_contact`.
    """

    def __init__(self, registry: Registry, job_id: str, attempt_id: str, on_lost_contact=_abandon):
        self.registry, self.job_id, self.attempt_id, self.on_lost_contact = (
            registry,
            job_id,
            attempt_id,
            on_lost_contact,
        )
        self.superseded = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_SECONDS + 10)

    def _run(self) -> None:
        heard = time.monotonic()
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                owner = self.registry.client.get_run(self.job_id).data.tags.get("job.attempt_id")
                if owner != self.attempt_id:
                    log.warning("job %s: attempt %s was superseded by %s", self.job_id, self.attempt_id, owner)
                    self.superseded.set()
                    return
                mark_job(self.registry, self.job_id, heartbeat_at=repr(time.time()))
                heard = time.monotonic()
            except Exception as exc:
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)
                if time.monotonic() - heard >= LEASE_SECONDS and not self._stop.is_set():
                    self.on_lost_contact(self.job_id)
                    return

    def check(self) -> None:
        """Raise Superseded if another attempt owns the job now (read afresh, not only the last beat)."""
        if self.superseded.is_set():
            raise Superseded(self.job_id)
        if self.registry.client.get_run(self.job_id).data.tags.get("job.attempt_id") != self.attempt_id:
            self.superseded.set()
            raise Superseded(self.job_id)


def heartbeat_age(tags: dict, now: float | None = None) -> float | None:
    """Seconds since the running attempt was last heard from (its start counts), or None if never."""
    last = max((float(tags[key]) for key in ("job.heartbeat_at", "job.started_at") if key in tags), default=None)
    return None if last is None else (now or time.time()) - last


def execute_job(
    registry: Registry,
    job_id: str,
    max_attempts: int,
    worker: str,
    time_limit: int,
    previous_lost: bool = False,
    on_lost_contact=_abandon,
) -> str:
    """Run one attempt of a job, wherever it runs; returns its final status, "skipped" or "busy".

    A job already finished (a message delivered twice) is left alone ("skipped"). A job whose
    attempt is still running and was heard from within LEASE_SECONDS is left to it ("busy": a
    broker redelivered the message while its first taker still works); `previous_lost` says the
    caller knows that attempt's process is gone. Otherwise an earlier attempt that never finished
    is lost: it is recorded and whatever it registered removed; then the job runs again, or fails
    once `max_attempts` were used. While it runs, the attempt beats (`Heartbeat`), and it stops
    without writing more as soon as another attempt owns the job.
    """
    from billiard.exceptions import SoftTimeLimitExceeded

    mlflow_setup(registry)
    tags = registry.client.get_run(job_id).data.tags
    if tags.get("job.status") in FINAL:
        log.warning("job %s already %s; not running it again", job_id, tags["job.status"])
        return "skipped"
    if tags.get("job.status") == "running" and not previous_lost:
        age = heartbeat_age(tags)
        if age is not None and age < LEASE_SECONDS:
            log.warning("job %s: attempt %s on %s was heard from %.1f s ago; leaving the job to it", job_id,
                        tags.get("job.attempt"), tags.get("job.worker"), age)  # fmt: skip
            return "busy"
    attempt = int(tags.get("job.attempt", "0")) + 1
    if attempt > 1:
        lost = f"Attempt {attempt - 1} on {tags.get('job.worker', 'a worker')} was lost: its process ended without reporting (killed or crashed)."
        remove_versions_of(registry, job_id)
        if attempt > max_attempts:
            fail_job(registry, job_id, f"{lost} No attempts left (TRAIN_MAX_ATTEMPTS={max_attempts}).")
            return "failed"
        mark_job(registry, job_id, lost=lost)
    attempt_id = uuid.uuid4().hex
    now = repr(time.time())
    mark_job(registry, job_id, "running", attempt=attempt, attempt_id=attempt_id, worker=worker, pid=os.getpid(),
             started_at=now, heartbeat_at=now, phase="validating", phase_started_at=now)  # fmt: skip
    heartbeat = Heartbeat(registry, job_id, attempt_id, on_lost_contact).start()

    def on_phase(phase: str) -> None:
        heartbeat.check()
        mark_job(registry, job_id, phase=phase, phase_started_at=repr(time.time()))

    from training.job import TrainingSpec, run_training

    request = json.loads(tags["job.request"])
    reference = json.loads(tags["job.dataset"])
    spec = TrainingSpec(request["estimator"], request["params"], request["model_name"], request["activate"])
    try:
        dataset = load_job_dataset(registry, job_id, reference)
        result = run_training(registry, spec, dataset, run_id=job_id, on_phase=on_phase,
                              log_dataset="builtin" in reference)  # fmt: skip
        heartbeat.stop()
        try:
            heartbeat.check()
        except Superseded:  # taken over after registering: what this attempt registered goes
            _withdraw(registry, job_id, ModelRef(**result["model"]))
            raise
    except Exception as exc:
        heartbeat.stop()
        try:
            if not isinstance(exc, Superseded):
                heartbeat.check()  # a failure is recorded only by the attempt that still owns the job
        except Superseded:
            exc = Superseded(job_id)
        if isinstance(exc, Superseded):
            log.warning("job %s: another attempt owns it now; attempt %s stops and records nothing", job_id, attempt)
            return "superseded"
        if isinstance(exc, SoftTimeLimitExceeded):
            fail_job(registry, job_id, time_limit_error(time_limit))
        else:
            log.exception("job %s failed", job_id)
            fail_job(registry, job_id, f"{type(exc).__name__}: {exc}")
        return "failed"
    mark_job(registry, job_id, "succeeded", activated=result["activated"], finished_at=repr(time.time()))
    return "succeeded"


def preload_training() -> None:
    """Import what every job uses, once, in a process that runs jobs (a Celery worker, a local job's process).

    Each attempt's process is forked from it and starts warm, and an attempt's time limit counts its
    training, not seconds of imports. A serving process never calls this: it does not need scikit-learn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow.sklearn  # noqa: F401
    import skops.io  # noqa: F401

    import training.datasets  # noqa: F401
    import training.job  # noqa: F401


def mlflow_setup(registry: Registry) -> None:
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- reading: no side effects ------------------------------------------------------------------------
def _seconds(later: float | None, earlier: float | None) -> float | None:
    return round(later - earlier, 3) if later is not None and earlier is not None else None


@translate_errors
def get_job(registry: Registry, job_id: str) -> dict:
    """The job as its record says: status, phase, attempt, how long it waited and ran, its result or error."""
    if not (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
        raise JobNotFound(job_id)
    try:
        run = translate_errors(registry.client.get_run)(job_id)
    except ModelNotFound as exc:  # the registry's "no such resource", here a run
        raise JobNotFound(job_id) from exc
    tags = run.data.tags
    if tags.get(KIND_TAG) != "training" or run.info.experiment_id != registry.get_experiment_id():
        raise JobNotFound(job_id)
    if run.info.lifecycle_stage == "deleted":
        raise JobNotFound(job_id)
    status = tags.get("job.status", "queued")
    now = time.time()
    times = {
        key: float(tags[f"job.{key}"]) for key in ("created_at", "started_at", "finished_at") if f"job.{key}" in tags
    }
    request = json.loads(tags.get("job.request", "{}"))
    job = {
        "job_id": job_id,
        "status": status,
        "estimator": request.get("estimator"),
        "params": request.get("params"),
        "dataset": request.get("dataset"),
        "created_at": iso_time(run.info.start_time),
        "location": f"/train/jobs/{job_id}",
    }
    if status == "queued":
        job["waited_seconds"] = _seconds(now, times.get("created_at"))
        return job
    job.update(attempt=int(tags.get("job.attempt", "1")), worker=tags.get("job.worker"),
               waited_seconds=_seconds(times.get("started_at"), times.get("created_at")),
               started_at=iso_time(int(times["started_at"] * 1000)) if "started_at" in times else None)  # fmt: skip
    if status == "running":
        job["phase"] = tags.get("job.phase")
        job["phase_elapsed_seconds"] = _seconds(now, float(tags.get("job.phase_started_at", now)))
        job["elapsed_seconds"] = _seconds(now, times.get("started_at"))
        age = heartbeat_age(tags, now)
        job["heartbeat_age_seconds"] = round(age, 3) if age is not None else None
    else:
        job["finished_at"] = iso_time(int(times["finished_at"] * 1000)) if "finished_at" in times else None
        job["elapsed_seconds"] = _seconds(times.get("finished_at"), times.get("started_at"))
    if "job.lost" in tags:
        job["lost_attempt"] = tags["job.lost"]
    if status == "succeeded":
        job["result"] = {
            "model": {"name": tags["model_name"], "version": tags["model_version"]},
            "run_id": job_id,
            "metrics": dict(run.data.metrics),
            "activated": tags.get("job.activated") == "True",
        }
    if status == "failed":
        job["error"] = tags.get("job.error", "unknown error")
    return job


def wait_for_job(registry: Registry, job_id: str, timeout: float) -> dict:
    """Poll the job until it finishes or `timeout` passes; returns its last state."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        job = get_job(registry, job_id)
        if job["status"] in FINAL or time.monotonic() > deadline:
            return job
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
