"""The local executor (TRAIN_EXECUTOR=local, `make run`): jobs run on this machine, no broker needed.

`LocalExecutor.send` has the fork server (training/fork_server.py), which imported the training code once,
fork the job's process, which runs `main` at once; without one it starts `python -m training.local_executor
<job id>`, which imports it all first. Either way the job's process is in a session of its own: the job
belongs to no serving worker, and outlives a restart or a recycled worker of the API. It waits for
one of this machine's TRAIN_WORKER_CONCURRENCY slots (the job reads `queued` meanwhile), then runs
the same `execute_job` a Celery worker runs, in Celery's own process pool (billiard) with the same
soft and hard time limits: a lost process is retried like a redelivered message (TRAIN_MAX_ATTEMPTS),
a process past the hard limit is killed and its job recorded failed. Every line the job's processes
log carries its `job_id`; they write to `STATE_DIR/jobs/<id>.log`.

What a broker's redelivery does for Celery, the sweeper does here: each job's process holds its
lock file (`STATE_DIR/jobs/<id>.lock`) for as long as it lives, so a free lock of an unfinished job
means its processes are gone (killed, a restart, a power cut). Every serving worker sweeps every
SWEEP_SECONDS and starts such a job again; its next attempt records the lost one, then retries it or
fails it (TRAIN_MAX_ATTEMPTS). Each attempt writes its own transitions in the job's record; this
executor's pool, which supervises it, writes only a hard kill (`JobRecord.time_limit`), as Celery does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kernel.config import PROJECT_ROOT, Settings, settings_from_json, settings_to_json
from kernel.logs import set_job_id
from kernel.registry import ModelNotFound, RegistryUnavailable, registry_from_settings
from training.attempt import (
    AttemptOutcome,
    configure_job_logging,
    execute_job,
    hard_time_limit,
    is_time_limit,
    preload_training,
    worker_name,
)
from training.fork_server import ForkServerClient, drop_inherited_connections
from training.job_record import JobRecord
from training.submitter import ExecutorUnavailable

log = logging.getLogger(__name__)

SLOT_POLL_SECONDS = 0.5
SWEEP_SECONDS = 10.0
# A lock file younger than this is left alone: its process may still be starting (or was just started again).
RELAUNCH_SECONDS = 30.0


def job_lock_path(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / f"{job_id}.lock"


def try_lock(path: Path):
    """The open file, locked, or None if a living process holds it."""
    handle = open(path, "a")  # noqa: SIM115 - held for the job's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        handle.close()
        return None


class LocalExecutor:
    """Starts each job in a detached process on this machine, and starts again any whose process died."""

    def __init__(self, settings: Settings, registry):
        self.settings, self.registry = settings, registry
        self.state_dir = Path(settings.STATE_DIR)
        self._sweeper = None
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
        self.fork_server = ForkServerClient(env)

    def send(self, job_id: str) -> None:
        """Start the job's process, forked warm by the fork server, or cold if none answers yet; ExecutorUnavailable
        if it cannot start."""
        folder = self.state_dir / "jobs"
        folder.mkdir(parents=True, exist_ok=True)
        job_lock_path(self.state_dir, job_id).touch()  # the sweeper's record that this machine runs it
        settings_json = settings_to_json(self.settings)  # this app's settings, a test's overrides included
        try:
            if self.settings.TRAIN_WARM_START and self.fork_server.fork_job(
                job_id, settings_json, folder / f"{job_id}.log"
            ):
                return
        except OSError as exc:  # no private folder for the socket: every job starts cold
            log.warning("no fork server for training jobs: %s", exc)
        try:
            with open(folder / f"{job_id}.log", "w") as output:
                # The launcher forks the job's process and exits at once: no zombie for the serving worker.
                # The job's process receives the settings on its stdin.
                subprocess.run([sys.executable, "-m", "training.local_executor", job_id], cwd=PROJECT_ROOT,
                               env=self.fork_server.env, input=settings_json.encode(), stdout=output,
                               stderr=subprocess.STDOUT, check=True, timeout=30, start_new_session=True)  # fmt: skip
        except (subprocess.SubprocessError, OSError) as exc:
            job_lock_path(self.state_dir, job_id).unlink(missing_ok=True)
            raise ExecutorUnavailable(f"the job's process could not start: {exc}") from exc

    def start_fork_server(self) -> None:
        """Have this code's fork server running, so that the next job starts warm (returns at once); nothing
        with `TRAIN_WARM_START=false`."""
        if not self.settings.TRAIN_WARM_START:
            return
        try:
            if not self.fork_server.is_up():
                self.fork_server.start_server()
        except OSError as exc:
            log.warning("no fork server for training jobs: %s", exc)

    def recover(self) -> list[str]:
        """Start again each unfinished job of this machine whose processes are gone; returns their ids."""
        started = []
        for path in sorted((self.state_dir / "jobs").glob("*.lock")):
            job_id = path.stem
            try:
                if time.time() - path.stat().st_mtime < RELAUNCH_SECONDS:
                    continue
                handle = try_lock(path)
            except FileNotFoundError:  # its job just finished
                continue
            if handle is None:  # its process is alive
                continue
            try:
                finished = JobRecord(self.registry, job_id).read().status.finished
            except ModelNotFound:  # the job's run is gone: nothing to run
                finished = True
            except RegistryUnavailable:  # the job cannot run without its record either: later
                return started
            finally:
                handle.close()  # before a new process is started, which must take the lock itself
            if finished:
                path.unlink(missing_ok=True)
                continue
            os.utime(path)  # at most one start per RELAUNCH_SECONDS, whichever serving worker sweeps
            log.warning("training job %s lost its process on this machine; starting it again", job_id)
            try:
                self.send(job_id)
            except ExecutorUnavailable as exc:
                log.error("could not start job %s again: %s", job_id, exc)
                continue
            started.append(job_id)
        return started

    def start_sweeper(self, owner: int | None = None) -> None:
        """Sweep now and every SWEEP_SECONDS in a daemon thread (once per process; again after a fork).

        `owner`: the process whose end ends the fork server; a gunicorn worker passes its master, so that a
        recycled worker does not take the warm parent with it and every worker shares one.
        """
        if owner is not None:
            self.fork_server.owner = owner
        if self._sweeper is not None and self._sweeper.is_alive():
            return

        def sweep_forever() -> None:
            while True:
                try:
                    self.start_fork_server()  # again after the process that started it ended
                    self.recover()
                except Exception:  # the sweeper must outlive any one failure
                    log.exception("sweeping training jobs failed")
                time.sleep(SWEEP_SECONDS)

        self._sweeper = threading.Thread(target=sweep_forever, name="training-job-sweeper", daemon=True)
        self._sweeper.start()


def wait_for_slot(state_dir: Path, slots: int):
    """An open, locked slot file of this machine, once one is free (the kernel frees it when we end)."""
    folder = state_dir / "train-slots"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(slots):
            handle = try_lock(folder / f"slot-{index}.lock")
            if handle is not None:
                return handle
        time.sleep(SLOT_POLL_SECONDS)


def run_attempt(settings: Settings, job_id: str) -> AttemptOutcome:
    """One attempt, in the pool's process: the same function a Celery worker runs."""
    set_job_id(job_id)  # inherited from the job's process already; said again where the attempt starts
    registry = registry_from_settings(settings)
    limit = settings.TRAIN_TIME_LIMIT_SECONDS
    # previous_lost: this process holds the job's lock, so no other process of this machine runs it
    return execute_job(registry, job_id, settings.TRAIN_MAX_ATTEMPTS, worker_name(), limit, previous_lost=True)


def run_job(settings: Settings, job_id: str) -> AttemptOutcome | None:
    """Run the job's attempts in a billiard pool, one fresh process each, with Celery's time limits.

    Returns the last attempt's outcome (None if its process died). The pool supervises each attempt:
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
            return pool.apply_async(run_attempt, (settings, job_id)).get()
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
    slot = wait_for_slot(Path(settings.STATE_DIR), settings.TRAIN_WORKER_CONCURRENCY)
    preload_training()  # the attempts' processes fork from this one
    try:
        outcome = run_job(settings, job_id)
    finally:
        slot.close()
    if outcome is not None and outcome.job_finished:
        path.unlink(missing_ok=True)  # finished: nothing left for the sweeper
    job_lock.close()


if __name__ == "__main__":
    job_settings = settings_from_json(sys.stdin.read())  # read before the fork: the launcher's pipe
    if os.fork():  # the launcher returns at once; the forked process runs the job
        os._exit(0)
    main(sys.argv[1], job_settings)
