"""The local executor (TRAIN_EXECUTOR=local, `make run`): jobs run on this machine, no broker needed.

`LocalExecutor.send` has the fork server (training/fork_server.py), which imported the training code once,
fork the job's process, which runs `training.job_process.main` at once; without one it starts `python -m
training.job_process <job id>`, which imports it all first. Either way the job's process is in a session of
its own: the job belongs to no serving worker, and outlives a restart or a recycled worker of the API. What
that process does (its lock, a slot, the attempts in a billiard pool with Celery's time limits) is
training/job_process.py's. Every line the job's processes log carries its `job_id`; they write to
`STATE_DIR/jobs/<id>.log`.

What a broker's redelivery does for Celery, the sweeper does here: each job's process holds its
lock file (`STATE_DIR/jobs/<id>.lock`) for as long as it lives, so a free lock of an unfinished job
means its processes are gone (killed, a restart, a power cut). Every serving worker sweeps every
SWEEP_SECONDS and starts such a job again; its next attempt records the lost one, then retries it or
fails it (TRAIN_MAX_ATTEMPTS). A job the API recorded but never started (it stopped between the two: no lock
file anywhere, and its record never marked sent) is started once it is QUEUED_GRACE_SECONDS old, by whichever
machine's sweeper sees it first; a job's process marks its record sent while it waits for a slot, so that a job
waiting its turn on one machine is never taken for one nobody started.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kernel.config import PROJECT_ROOT, Settings, settings_to_json
from kernel.locks import try_lock
from kernel.registry import ModelNotFound, RegistryUnavailable
from training.fork_server import ForkServerClient
from training.job_process import job_lock_path
from training.job_record import QUEUED_GRACE_SECONDS, JobRecord
from training.submitter import ExecutorUnavailable

log = logging.getLogger(__name__)

SWEEP_SECONDS = 10.0
# A lock file younger than this is left alone: its process may still be starting (or was just started again).
RELAUNCH_SECONDS = 30.0
# How often a process looks for jobs that were never started (one search of the registry).
UNSENT_SWEEP_SECONDS = QUEUED_GRACE_SECONDS / 2


class LocalExecutor:
    """Starts each job in a detached process on this machine, and starts again any whose process died."""

    def __init__(self, settings: Settings, registry):
        self.settings, self.registry = settings, registry
        self.state_dir = Path(settings.STATE_DIR)
        self._sweeper = None
        self._unsent_swept = 0.0
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
                subprocess.run([sys.executable, "-m", "training.job_process", job_id], cwd=PROJECT_ROOT,
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

    def recover(self, now: float | None = None) -> list[str]:
        """Start again each unfinished job of this machine whose processes are gone, and each local job never
        started (`recover_unsent`); returns their ids."""
        started = self._recover_lost()
        now = time.time() if now is None else now
        if now - self._unsent_swept >= UNSENT_SWEEP_SECONDS:
            self._unsent_swept = now
            started += self.recover_unsent(now)
        return started

    def recover_unsent(self, now: float) -> list[str]:
        """Start each local job recorded QUEUED_GRACE_SECONDS ago that no process ever took (no lock file here, its
        record never marked sent); returns their ids."""
        started = []
        try:
            queued = JobRecord.unfinished(self.registry, running=False)
        except RegistryUnavailable:
            return started
        for state in queued:
            if state.queue != "local" or not state.never_sent(now):
                continue
            if job_lock_path(self.state_dir, state.job_id).exists():  # this machine's: `_recover_lost` sees to it
                continue
            log.warning("training job %s was queued %.0f s ago and never started; starting it", state.job_id,
                        now - state.created)  # fmt: skip
            try:
                self.send(state.job_id)
                JobRecord(self.registry, state.job_id).sent(again_for=0)
            except (ExecutorUnavailable, RegistryUnavailable) as exc:
                log.error("could not start job %s: %s", state.job_id, exc)
                continue
            started.append(state.job_id)
        return started

    def _recover_lost(self) -> list[str]:
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
