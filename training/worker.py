"""The local executor (TRAIN_EXECUTOR=local, `make run`): jobs run on this machine, no broker needed.

`LocalExecutor.send` starts `python -m training.worker <job id>`, which detaches at once: the job
belongs to no serving worker, and outlives a restart or a recycled worker of the API. It waits for
one of this machine's TRAIN_WORKER_CONCURRENCY slots (the job reads `queued` meanwhile), then runs
the same `execute_job` a Celery worker runs, in Celery's own process pool (billiard) with the same
soft and hard time limits: a lost process is retried like a redelivered message (TRAIN_MAX_ATTEMPTS),
a process past the hard limit is killed and its job recorded failed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from serving.config import PROJECT_ROOT, load_config
from training.jobs import ExecutorUnavailable

SLOT_POLL_SECONDS = 0.5


class LocalExecutor:
    """Starts each job in a detached process on this machine."""

    def __init__(self, config: dict):
        self.config = config
        # The job's process gets this app's settings (a test's overrides included), by their names.
        self.settings = {name: str(config[name]) for name in load_config() if config.get(name) is not None}

    def send(self, job_id: str) -> None:
        """Start the job's process; ExecutorUnavailable if it cannot start."""
        folder = Path(self.config["STATE_DIR"]) / "jobs"
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
        try:
            with open(folder / f"{job_id}.log", "w") as output:
                # The launcher forks the job's process and exits at once: no zombie for the serving worker.
                subprocess.run([sys.executable, "-m", "training.worker", job_id], cwd=PROJECT_ROOT, env=env,
                               stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True,
                               timeout=30, start_new_session=True)  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            raise ExecutorUnavailable(f"the job's process could not start: {exc}") from exc


def wait_for_slot(state_dir: Path, slots: int):
    """An open, locked slot file of this machine, once one is free (the kernel frees it when we end)."""
    folder = state_dir / "train-slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(slots):
            handle = open(folder / f"slot-{index}.lock", "a")  # noqa: SIM115 - held for the job's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        time.sleep(SLOT_POLL_SECONDS)


def _attempt(config: dict, job_id: str) -> str:
    """One attempt, in the pool's process: the same function a Celery worker runs."""
    from serving.registry import registry_from_config
    from training.jobs import execute_job, worker_name

    registry = registry_from_config(config)
    limit = config["TRAIN_TIME_LIMIT_SECONDS"]
    return execute_job(registry, job_id, config["TRAIN_MAX_ATTEMPTS"], worker_name(), limit)


def run_job(config: dict, job_id: str) -> None:
    """Run the job's attempts in a billiard pool, one fresh process each, with Celery's time limits."""
    from billiard.exceptions import TimeLimitExceeded, WorkerLostError
    from billiard.pool import Pool

    from serving.registry import registry_from_config
    from training.celery_app import hard_time_limit
    from training.jobs import fail_job, time_limit_error

    limit = config["TRAIN_TIME_LIMIT_SECONDS"]
    for _ in range(config["TRAIN_MAX_ATTEMPTS"] + 1):  # the last one records the lost attempts and fails
        pool = Pool(1, maxtasksperchild=1, soft_timeout=limit, timeout=hard_time_limit(limit), lost_worker_timeout=1)
        try:
            pool.apply_async(_attempt, (config, job_id)).get()
            return
        except Exception as wrapped:  # billiard hands the pool's own errors over wrapped, with their traceback
            error = getattr(wrapped, "exc", wrapped)
            if isinstance(error, TimeLimitExceeded):  # killed at the hard limit: it could not record that itself
                fail_job(registry_from_config(config), job_id, time_limit_error(limit))
                return
            if not isinstance(error, WorkerLostError):
                raise
            # the process died: the next attempt records the lost one, then retries or fails the job
        finally:
            pool.terminate()


def main(job_id: str) -> None:
    os.nice(10)  # training yields the CPU to the serving workers of the same machine
    config = load_config()
    slot = wait_for_slot(Path(config["STATE_DIR"]), config["TRAIN_WORKER_CONCURRENCY"])
    try:
        run_job(config, job_id)
    finally:
        slot.close()


if __name__ == "__main__":
    if os.fork():  # the launcher returns at once; the forked process runs the job
        os._exit(0)
    main(sys.argv[1])
