"""Training on Celery workers (TRAIN_EXECUTOR=celery): the app, its one task, and how a job is sent.

A worker (`make worker`, i.e. `python -m training.celery_worker`) takes one job per process at a
time (prefetch 1), acknowledges it only once it has finished (acks late), and hands it back to
the broker if its process dies (reject on worker lost); a worker machine that vanishes has its
job redelivered after the broker's visibility timeout, which is longer than the hard time limit.
The task is `training.attempt.execute_job`, the same function the local executor runs. A delivery that
finds another attempt still beating (a redelivery while its first taker works) looks again after a lease;
one that cannot reach the tracking server, which holds the job's record, tries again every
REGISTRY_RETRY_SECONDS: neither loses the job. The attempt writes its own transitions in the job's
record; the worker's main process, which supervises it, writes only a hard kill (`JobRequest.on_timeout`).
"""

from __future__ import annotations

import json
import logging
import os
import time

from celery import Celery, signals
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool
from celery.worker.request import Request
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlStore
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSqlStore
from mlflow.utils import request_utils

from kernel.config import Settings
from kernel.logs import set_job_id
from kernel.registry import RegistryUnavailable, registry_from_settings, translate_errors
from training.attempt import LEASE_SECONDS, AttemptOutcome, execute_job, hard_time_limit, is_time_limit
from training.job_record import JobRecord
from training.submitter import ExecutorUnavailable

log = logging.getLogger(__name__)

TASK_NAME = "training.run_job"
QUEUE_UNREACHABLE = ("The training queue cannot be reached (CELERY_BROKER_URL); nothing was queued. Predictions "
                     "are not affected.")  # fmt: skip
REGISTRY_RETRY_SECONDS = 15  # how often a job whose record is out of reach (tracking server down) tries again


def visibility_timeout(seconds: int) -> int:
    """How long the broker waits for an unacknowledged job before giving it to another worker."""
    return hard_time_limit(seconds) + 30


class JobRequest(Request):
    """A job's request in the worker's main process, which supervises the attempt: records a hard kill."""

    def on_timeout(self, soft, timeout):
        super().on_timeout(soft, timeout)
        if not soft:  # the hard limit: the pool killed the process, which cannot record it itself
            settings = self.task.app.conf.training_settings
            record = JobRecord(registry_from_settings(settings), self.id)
            record.time_limit(settings.TRAIN_TIME_LIMIT_SECONDS, worker=f"{self.hostname}:{self.worker_pid}")


@signals.worker_process_init.connect(weak=False, dispatch_uid="training.fresh_connections")
def fresh_connections(**kwargs) -> None:
    """A job process forked from the worker drops the MLflow connections the worker itself opened.

    Quick, and no imports: the worker gives a new process a few seconds to report that it is up.
    """
    request_utils._cached_get_request_session.cache_clear()
    for store_class in (TrackingSqlStore, RegistrySqlStore):
        for engine in store_class._engine_map.values():
            engine.dispose(close=False)


# A process that closed its pipes but is not reaped yet is looked at again this often, for at most EXIT_WAIT_SECONDS.
EXIT_POLL_SECONDS = 0.02
EXIT_WAIT_SECONDS = 5.0


class PromptAsynPool(AsynPool):
    """Celery's prefork pool, which replaces a job's process as soon as it has exited (celery/celery#9588).

    Each job has a fresh process (max tasks per child 1). The pool learns that one ended when its pipe closes,
    then reaps it and starts the next; but a process closes its pipes a moment before it can be reaped, and a
    pool that looks in that moment finds it still alive and waits for its 5 s timer: the next job waited up to
    5 s (measured: 2.5-4 s for a third of the jobs of a burst on two workers). Here the pool looks again every
    EXIT_POLL_SECONDS until it is reaped.
    """

    def _event_process_exit(self, hub, proc):
        super()._event_process_exit(hub, proc)
        if proc.exitcode is None:  # closed, not reaped yet
            self._look_again(hub, proc, time.monotonic() + EXIT_WAIT_SECONDS)

    def _look_again(self, hub, proc, deadline: float) -> None:
        def look() -> None:
            if proc.exitcode is not None:
                self.maintain_pool()
            elif time.monotonic() < deadline:
                self._look_again(hub, proc, deadline)

        hub.call_later(EXIT_POLL_SECONDS, look)


class PromptTaskPool(TaskPool):
    """The prefork pool with PromptAsynPool (`worker_pool` below)."""

    Pool = PromptAsynPool


def make_celery(settings: Settings) -> Celery:
    """The Celery app for these settings; connects to the broker only when it sends or works."""
    limit = settings.TRAIN_TIME_LIMIT_SECONDS
    options = {"visibility_timeout": visibility_timeout(limit), **json.loads(settings.CELERY_BROKER_TRANSPORT_OPTIONS)}
    if settings.CELERY_BROKER_URL.startswith("redis"):
        options.setdefault("socket_connect_timeout", 3)
        # A message whose worker vanished is handed out again within 10 s of its visibility timeout, not 100 s
        # (kombu looks every 10 s, but scans only every 10th time by default): one small Redis query per 10 s.
        options.setdefault("unacked_restore_throttle", 1)
    app = Celery("training", broker=settings.CELERY_BROKER_URL, set_as_current=False)
    app.conf.update(
        training_settings=settings,
        broker_transport_options=options,
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.TRAIN_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_soft_time_limit=limit,
        task_time_limit=hard_time_limit(limit),
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.TRAIN_WORKER_CONCURRENCY,
        worker_max_tasks_per_child=1,  # a fresh process per job: nothing one job leaves behind reaches the next
        worker_pool=f"{__name__}:PromptTaskPool",  # ... started as soon as the last one has ended
        worker_hijack_root_logger=False,
        worker_proc_alive_timeout=60,  # a fresh job process on a busy machine may take a while to say it is up
        task_serializer="json",
        accept_content=["json"],
    )

    @app.task(name=TASK_NAME, bind=True, Request=JobRequest, max_retries=None)
    def run_job(task, job_id: str) -> str:
        settings = task.app.conf.training_settings
        worker = f"{task.request.hostname}:{os.getpid()}"
        registry = registry_from_settings(settings)
        limit = settings.TRAIN_TIME_LIMIT_SECONDS
        set_job_id(job_id)  # every line while the attempt runs, its heartbeat thread's too
        try:
            outcome = translate_errors(execute_job)(registry, job_id, settings.TRAIN_MAX_ATTEMPTS, worker, limit)
        except RegistryUnavailable as exc:  # the job's record is out of reach: keep the job, try again later
            log.warning("job %s: %s; trying again in %d s", job_id, exc, REGISTRY_RETRY_SECONDS)
            raise task.retry(countdown=REGISTRY_RETRY_SECONDS, exc=exc) from None
        except Exception as exc:  # the soft limit before the attempt could catch it: record it, as the hard one is
            if not is_time_limit(exc):
                raise
            JobRecord(registry, job_id).time_limit(limit, worker=worker)
            return AttemptOutcome.FAILED.value
        finally:
            set_job_id(None)
        if outcome == AttemptOutcome.BUSY:  # redelivered while its first taker still works: look again after its lease
            raise task.retry(countdown=LEASE_SECONDS)
        return outcome.value

    return app


class CeleryExecutor:
    """Sends jobs to the broker; the API machine never trains."""

    def __init__(self, settings: Settings):
        self.app = make_celery(settings)

    def send(self, job_id: str) -> None:
        """Queue the job (its id is the task's id); ExecutorUnavailable if the broker cannot be reached."""
        try:
            self.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, retry=True)
        except Exception as exc:  # kombu's OperationalError, a socket error, botocore's errors for SQS
            log.error("could not queue job %s: %s", job_id, exc)
            raise ExecutorUnavailable(str(exc), QUEUE_UNREACHABLE) from exc
