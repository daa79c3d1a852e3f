"""A local job's own process (TRAIN_EXECUTOR=local): its lock, a slot of this machine, then its attempts.

Forked warm by the fork server (training/fork_server.py), which calls `main` at once, or started cold with
`python -m training.job_process <job id>` (its settings on stdin) by `LocalExecutor.send`
(training/local_executor.py). It holds the job's lock file (`STATE_DIR/jobs/<id>.lock`) for as long as
it lives: a free lock of an unfinished job means its processes are gone, and the executor's sweeper starts
it again. It waits for one of this machine's TRAIN_WORKER_CONCURRENCY slots (the job reads `queued`
meanwhile), then runs the same `execute_job` a Celery worker runs, in Celery's own process pool
(billiard) with the same soft and hard time limits: a lost process is retried like a redelivered
message (TRAIN_MAX_ATTEMPTS), and a process past the hard limit is killed and its job recorded failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from kernel.config import Settings, settings_from_json
from kernel.locks import release, try_lock
from kernel.logs import set_job_id
from kernel.registry import registry_from_settings
from training.attempt import (
    AttemptOutcome,
    configure_job_logging,
    execute_job,
    hard_time_limit,
    is_time_limit,
    preload_training,
    worker_name,
)
from training.job_record import JobRecord

log = logging.getLogger(__name__)

# A free slot is taken within this: a flock try per slot, so 20 a second cost nothing (0.5 s was a job's wait).
SLOT_POLL_SECONDS = 0.05


def job_lock_path(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / f"{job_id}.lock"


def drop_inherited_connections() -> None:
    """In a forked process: MLflow's HTTP sessions and database pools of the parent are left to it, new ones opened."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSqlStore
    from mlflow.utils import request_utils

    request_utils._cached_get_request_session.cache_clear()
    for store_class in (TrackingSqlStore, RegistrySqlStore):
        for engine in store_class._engine_map.values():
            engine.dispose(close=False)


def wait_for_slot(state_dir: Path, slots: int, on_wait=lambda: None):
    """An open, locked slot file of this machine, once one is free (the kernel frees it when we end). `on_wait` is
    called once, if none is free at first."""
    folder = state_dir / "train-slots"
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(slots):
            handle = try_lock(folder / f"slot-{index}.lock")
            if handle is not None:
                return handle
        if not waited:
            waited = True
            on_wait()
        time.sleep(SLOT_POLL_SECONDS)


def mark_waiting(settings: Settings, job_id: str) -> None:
    """The job waits for a slot, queued: its record says a process has it, so that no sweeper takes it for a job the
    API never started (training/local_executor.py). Never fails the job: at worst another machine runs it too,
    and the attempt-id fence lets one attempt win."""
    try:
        JobRecord(registry_from_settings(settings), job_id).sent()
    except Exception as exc:
        log.warning("could not mark job %s as waiting: %s", job_id, exc)


def run_attempt(settings: Settings, job_id: str) -> AttemptOutcome:
    """One attempt, in the pool's process: the same function a Celery worker runs."""
    set_job_id(job_id)  # inherited from the job's process already; said again where the attempt starts
    registry = registry_from_settings(settings)
    limit = settings.TRAIN_TIME_LIMIT_SECONDS
    # previous_lost: this process holds the job's lock, so no other process of this machine runs it
    return execute_job(registry, job_id, settings.TRAIN_MAX_ATTEMPTS, worker_name(), limit, previous_lost=True)


def run_job(settings: Settings, job_id: str, on_answer=lambda: None) -> AttemptOutcome | None:
    """Run the job's attempts in a billiard pool, one fresh process each, with Celery's time limits.

    Returns the last attempt's outcome (None if its process died). `on_answer` is called as soon as an
    attempt has answered, before its pool is taken down (billiard's `terminate` takes about a second: the
    job's slot is freed first, so the next job starts at once). The pool supervises each attempt:
    one killed at the hard time limit cannot record that itself, so this process records it
    (`JobRecord.time_limit`), as Celery's `JobRequest.on_timeout` does.
    """
    from billiard.exceptions import TimeLimitExceeded, WorkerLostError
    from billiard.pool import Pool

    limit = settings.TRAIN_TIME_LIMIT_SECONDS
    for _ in range(settings.TRAIN_MAX_ATTEMPTS + 1):  # the last one records the lost attempts and fails
        pool = Pool(
            1,
            initializer=drop_inherited_connections,
            maxtasksperchild=1,
            soft_timeout=limit,
            timeout=hard_time_limit(limit),
            lost_worker_timeout=1,
        )
        try:
            outcome = pool.apply_async(run_attempt, (settings, job_id)).get()
            on_answer()
            return outcome
        except Exception as wrapped:  # billiard hands the pool's own errors over wrapped, with their traceback
            error = getattr(wrapped, "exc", wrapped)
            # Killed at the hard limit (it could not record that itself), or stopped by the soft limit before
            # its attempt could catch it (while it opened the registry): either way the limit is recorded here.
            if isinstance(error, TimeLimitExceeded) or is_time_limit(error):
                JobRecord(registry_from_settings(settings), job_id).time_limit(limit)
                return AttemptOutcome.FAILED
            if not isinstance(error, WorkerLostError):
                raise
            # the process died: the next attempt records the lost one, then retries or fails the job
        finally:
            pool.terminate()
    return None  # the last attempt's process died too: the job keeps its lock file, and the sweeper starts it again


def main(job_id: str, settings: Settings) -> None:
    """Run the job on this machine: hold its lock, wait for a slot, then its attempts."""
    configure_job_logging(settings)
    set_job_id(job_id)  # every line of this process and of its attempts' processes, from any thread
    os.nice(10)  # training yields the CPU to the serving workers of the same machine
    path = job_lock_path(settings.STATE_DIR, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    job_lock = try_lock(path)  # held, through the pool's processes too, until the job's last process ends
    if job_lock is None:
        return  # another process of this machine runs the job (the sweeper started it twice)
    slot = wait_for_slot(Path(settings.STATE_DIR), settings.TRAIN_WORKER_CONCURRENCY,
                         on_wait=lambda: mark_waiting(settings, job_id))  # fmt: skip
    preload_training()  # the attempts' processes fork from this one
    try:
        outcome = run_job(settings, job_id, on_answer=lambda: release(slot))
    finally:
        if not slot.closed:
            release(slot)
    if outcome is not None and outcome.job_finished:
        path.unlink(missing_ok=True)  # finished: nothing left for the sweeper
    job_lock.close()


if __name__ == "__main__":
    job_settings = settings_from_json(sys.stdin.read())  # read before the fork: the launcher's pipe
    if os.fork():  # the launcher returns at once; the forked process runs the job
        os._exit(0)
    main(sys.argv[1], job_settings)
