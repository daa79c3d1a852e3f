"""A training job's record: the `job.*` tags of its MLflow run, and the transitions that write them.

This is the only module that knows those tags. The submitter creates the record (`JobRecord.create`),
or discards it when no executor takes the job. The running attempt writes its own transitions:
`start`, `phase`, `beat`, then `succeed` or `fail`. One more write records a time limit, `time_limit`,
and comes from outside the attempt's own code: from its supervisor when it killed the attempt at the
hard limit (the local executor's billiard pool, and Celery's `JobRequest.on_timeout`; Celery records
its own hard kills the same way), or, when the soft limit stopped the attempt before the attempt could
catch it (while it opened the registry), from the code that ran it (the local pool's parent, or the
Celery task around `execute_job` in the same process). Everyone else only reads (`JobRecord.lookup`, `JobRecord.read`), so
`GET /train/jobs/<id>` reads the same from every worker and every instance.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from mlflow.entities import Run

from kernel.errors import DomainError
from kernel.registry import ModelNotFound, ModelRef, Registry

log = logging.getLogger(__name__)

KIND_TAG = "job.kind"
_MAX_TAG_LENGTH = 5000


class JobStatus(StrEnum):
    """Where the job is, as its record says (what `GET /train/jobs/<id>` answers)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class JobNotFound(DomainError):
    """No training job with that id (404)."""

    status = 404
    code = "job_not_found"

    def client_message(self) -> str:
        return f"No training job {str(self)!r}."


def time_limit_error(seconds: int) -> str:
    return f"The job exceeded its time limit of {seconds} seconds and was stopped; nothing was registered."


def _float(tags: dict, key: str) -> float | None:
    return float(tags[key]) if key in tags else None


# What a running job does, in this order (`JobRecord.phase`; training/run.py announces all but the first).
JOB_PHASES = ("validating", "fitting", "evaluating", "converting", "registering", "plotting")

# A job recorded but never handed to its executor is sent again once it is this old (the API may still be sending it
# before that): by a Celery worker's keeper (training/job_keeper.py), or a local executor's sweeper.
QUEUED_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class JobState:
    """The job's record at one read (times are Unix seconds; `attempt` 0 before the first one starts)."""

    job_id: str
    status: JobStatus
    request: dict
    dataset: dict
    created_at_ms: int
    created_at: float | None = None
    attempt: int = 0
    attempt_id: str | None = None
    worker: str | None = None
    phase: str | None = None
    phase_started_at: float | None = None
    started_at: float | None = None
    heartbeat_at: float | None = None
    finished_at: float | None = None
    queue: str | None = None  # where it goes: a Celery queue's name, or "local"; None for jobs older than the tag
    sent_at: float | None = None  # handed to the executor (the broker); None: never, or not yet
    resent_at: float | None = None  # sent again by a keeper (training/job_keeper.py), by its clock
    resent_for: int | None = None  # the attempt that was silent when it was sent again (0: never sent)
    error: str | None = None
    lost: str | None = None
    activated: bool = False
    not_activated: str | None = None  # why a job asked to activate did not (a rollout runs)
    model: ModelRef | None = None
    metrics: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)

    @classmethod
    def from_run(cls, run: Run) -> JobState:
        tags = run.data.tags
        model = ModelRef(tags["model_name"], tags["model_version"]) if "model_version" in tags else None
        return cls(
            job_id=run.info.run_id,
            status=JobStatus(tags.get("job.status", JobStatus.QUEUED)),
            request=json.loads(tags.get("job.request", "{}")),
            dataset=json.loads(tags.get("job.dataset", "{}")),
            created_at_ms=run.info.start_time,
            created_at=_float(tags, "job.created_at"),
            attempt=int(tags.get("job.attempt", "0")),
            attempt_id=tags.get("job.attempt_id"),
            worker=tags.get("job.worker"),
            phase=tags.get("job.phase"),
            phase_started_at=_float(tags, "job.phase_started_at"),
            started_at=_float(tags, "job.started_at"),
            heartbeat_at=_float(tags, "job.heartbeat_at"),
            finished_at=_float(tags, "job.finished_at"),
            queue=tags.get("job.queue"),
            sent_at=_float(tags, "job.sent_at"),
            resent_at=_float(tags, "job.resent_at"),
            resent_for=int(tags["job.resent_for"]) if tags.get("job.resent_for", "").isdigit() else None,
            error=tags.get("job.error"),
            lost=tags.get("job.lost"),
            activated=tags.get("job.activated") == "True",
            not_activated=tags.get("job.not_activated"),
            model=model,
            metrics=dict(run.data.metrics),
            phases=json.loads(tags.get("job.phases", "{}")),
        )

    @property
    def created(self) -> float:
        """When it was recorded (Unix seconds)."""
        return self.created_at if self.created_at is not None else self.created_at_ms / 1000

    def never_sent(self, now: float) -> bool:
        """Queued QUEUED_GRACE_SECONDS ago and never handed to its executor, nor sent again since: the API stopped
        between recording it and sending it."""
        unsent = self.status == JobStatus.QUEUED and self.sent_at is None and self.resent_for is None
        return unsent and now - self.created > QUEUED_GRACE_SECONDS

    def heartbeat_age(self, now: float | None = None) -> float | None:
        """Seconds since the running attempt was last heard from (its start counts), or None if never."""
        last = max((t for t in (self.heartbeat_at, self.started_at) if t is not None), default=None)
        return None if last is None else (now or time.time()) - last


class JobRecord:
    """One job's record in the registry: read it, or write one transition."""

    def __init__(self, registry: Registry, job_id: str):
        self.registry, self.job_id = registry, job_id
        self._phases: dict[str, float] = {}  # this attempt's phases so far, in seconds each
        self._phase: tuple[str, float] | None = None  # the phase under way and when it began

    def _end_phase(self, now: float) -> str:
        """The phases' seconds as JSON, the one under way ended at `now` (written with the next transition)."""
        if self._phase is not None:
            name, began = self._phase
            self._phases[name] = round(self._phases.get(name, 0.0) + now - began, 3)
        return json.dumps(self._phases)

    # ---- the submitter's ----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        registry: Registry,
        request: dict,
        dataset: dict,
        run_name: str,
        tags: dict[str, str],
        attach: Callable[[Run], None] | None = None,
    ) -> JobRecord:
        """A new job, SCHEDULED: its request and dataset reference, `tags` on its run, `attach` (the data) done.

        If anything fails before the job is scheduled, its run is deleted again.
        """
        record_tags = {KIND_TAG: "training", "job.request": json.dumps(request), "job.dataset": json.dumps(dataset),
                       "job.created_at": repr(time.time()), **tags}  # fmt: skip
        run = registry.create_run(record_tags, run_name)
        record = cls(registry, run.info.run_id)
        try:
            if attach is not None:
                attach(run)
            registry.set_run_status(record.job_id, "SCHEDULED")
        except Exception:
            record.discard()
            raise
        return record

    def discard(self) -> None:
        """Undo `create` for a job that could not be handed to any executor (nobody will ever run it)."""
        try:
            self.registry.delete_run(self.job_id)
        except Exception:
            log.warning("could not delete the run of unsent job %s", self.job_id)

    @staticmethod
    def count_waiting(registry: Registry, limit: int) -> int:
        """How many jobs wait for a worker (up to `limit`): runs still SCHEDULED."""
        filter_string = f"tags.`{KIND_TAG}` = 'training' and attributes.status = 'SCHEDULED'"
        return len(registry.search_runs(filter_string, max_results=limit))

    @staticmethod
    def unfinished(registry: Registry, limit: int = 1000, running: bool = True) -> list[JobState]:
        """The jobs queued or running (`running=False`: queued only), up to `limit` of each (for the keeper and
        the local sweeper, which send lost ones again)."""
        states = []
        for status in ("SCHEDULED", "RUNNING") if running else ("SCHEDULED",):
            filter_string = f"tags.`{KIND_TAG}` = 'training' and attributes.status = '{status}'"
            states += [JobState.from_run(run) for run in registry.search_runs(filter_string, max_results=limit)]
        return states

    def sent(self, again_for: int | None = None) -> None:
        """The job was handed to the executor; `again_for`: sent again by a keeper, for that silent attempt (0: for
        a job never sent)."""
        if again_for is None:
            self._write(sent_at=repr(time.time()))
        else:
            self._write(resent_at=repr(time.time()), resent_for=again_for)

    # ---- reading: no side effects -------------------------------------------------------------------------
    def read(self) -> JobState:
        """The record as it stands (for the attempt and the sweeper); ModelNotFound if the run is gone."""
        return JobState.from_run(self.registry.get_run(self.job_id))

    @classmethod
    def lookup(cls, registry: Registry, job_id: str) -> JobState:
        """The job a client names (`GET /train/jobs/<id>`); JobNotFound unless it is a job of the service's experiment."""
        if not (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
            raise JobNotFound(job_id)
        try:
            run = registry.get_run(job_id)
        except ModelNotFound as exc:  # the registry's "no such resource", here a run
            raise JobNotFound(job_id) from exc
        if run.data.tags.get(KIND_TAG) != "training" or run.info.experiment_id != registry.get_experiment_id():
            raise JobNotFound(job_id)
        if run.info.lifecycle_stage == "deleted":
            raise JobNotFound(job_id)
        return JobState.from_run(run)

    # ---- the running attempt's transitions ----------------------------------------------------------------
    def start(self, attempt: int, worker: str, pid: int, lost: str | None = None) -> str:
        """Attempt `attempt` takes the job (RUNNING, phase "validating"); returns its new attempt id.

        `lost` describes the earlier attempt that never finished, which this one replaces.
        """
        attempt_id = uuid.uuid4().hex
        self._phases, self._phase = {}, (JOB_PHASES[0], time.time())
        now = repr(self._phase[1])
        earlier = {"lost": lost} if lost is not None else {}
        self._write(JobStatus.RUNNING, attempt=attempt, attempt_id=attempt_id, worker=worker, pid=pid, phases="{}",
                    started_at=now, heartbeat_at=now, phase=JOB_PHASES[0], phase_started_at=now, **earlier)  # fmt: skip
        return attempt_id

    def phase(self, phase: str) -> None:
        """The attempt begins `phase` ("fitting", "evaluating", ...); `job.phases` gets the seconds of the last one."""
        now = time.time()
        phases = self._end_phase(now)
        self._phase = (phase, now)
        self._write(phase=phase, phase_started_at=repr(now), phases=phases)

    def beat(self) -> None:
        """The attempt is alive (its heartbeat thread, every few seconds)."""
        self._write(heartbeat_at=repr(time.time()))

    def remember_previous_active(self, previous: ModelRef) -> None:
        """Before the job activates its version: the model to hand back if the job fails after that."""
        self._write(previous_active=json.dumps(previous.as_dict()))

    def succeed(self, activated: bool, not_activated: str | None = None) -> None:
        """The job registered its version (and activated it when asked; `not_activated`: why it did not)."""
        now = time.time()
        reason = {"not_activated": not_activated} if not_activated else {}
        self._write(
            JobStatus.SUCCEEDED, activated=activated, finished_at=repr(now), phases=self._end_phase(now), **reason
        )

    def fail(self, error: str) -> None:
        """The job failed: whatever it registered is removed first, then the failure recorded."""
        self.remove_versions()
        self._write(JobStatus.FAILED, error=error, finished_at=repr(time.time()))

    # ---- a supervisor's one write -------------------------------------------------------------------------
    def time_limit(self, seconds: int, worker: str | None = None) -> None:
        """The attempt ran out of time and could not record it: it fails the job like `fail`.

        Written by the attempt's supervisor when it killed it at the hard limit (the local executor's pool,
        Celery's `JobRequest.on_timeout`), or by the code around the attempt when the soft limit stopped it
        before `execute_job` could catch it (the local pool's parent; the Celery task, in the same process).
        `worker`, the stopped attempt's "host:pid" (`job.worker`): nothing is written if another attempt runs the job
        now (one silent past the lease may have been sent again by a keeper and taken by another worker: the job is
        then the new attempt's), nor if it has finished.
        """
        if worker is not None:
            state = self.read()
            if state.status.finished or (state.status == JobStatus.RUNNING and state.worker != worker):
                log.warning("job %s: %s ran out of time, but no longer runs it", self.job_id, worker)
                return
        self.fail(time_limit_error(seconds))

    # ---- what a failed, lost or superseded attempt registered goes --------------------------------------------
    def remove_versions(self) -> None:
        """A failed (or lost) attempt registers nothing: delete what it registered, hand the active model back."""
        self._remove(self.registry.search_model_versions_of_run(self.job_id))

    def withdraw(self, ref: ModelRef) -> None:
        """Remove the one version a superseded attempt registered, handing the active model back if it had it."""
        self._remove({ref})

    def _remove(self, refs: set[ModelRef]) -> None:
        if not refs:
            return
        previous = self.registry.get_run(self.job_id).data.tags.get("job.previous_active")
        if self.registry.get_active_model() in refs and previous:
            self.registry.set_active_model(ModelRef(**json.loads(previous)))
        for ref in refs:
            log.warning("removing %s version %s of job %s", ref.name, ref.version, self.job_id)
            self.registry.delete_model_version(ref)

    def _write(self, status: JobStatus | None = None, **details) -> None:
        """The tags, then the run's MLflow status as the UI shows it."""
        tags = {f"job.{key}": str(value)[:_MAX_TAG_LENGTH] for key, value in details.items()}
        if status:
            tags["job.status"] = status.value
        self.registry.set_run_tags(self.job_id, tags)
        if status == JobStatus.RUNNING:
            self.registry.set_run_status(self.job_id, "RUNNING")
        elif status is not None and status.finished:
            self.registry.end_run(self.job_id, "FINISHED" if status == JobStatus.SUCCEEDED else "FAILED")
            _count(status)


def _count(status: JobStatus) -> None:
    """training_jobs_total{outcome}: shared with the API's /metrics where the job runs beside it."""
    try:
        from kernel.metrics import count_training_job

        count_training_job(status.value)
    except Exception:  # a metric must never fail a job
        log.exception("could not count the training job")
