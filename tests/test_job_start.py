"""A job's process starts at once: a local job's slot is free for the next job as soon as its attempt has answered,
a process forked from a warm parent does not warm up again, and Celery's pool replaces a job's process as soon as
it has exited. A stuck attempt ends at the hard time limit (training/job_process.py, training/attempt.py,
training/celery_executor.py)."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import billiard.pool
import pytest

from kernel.locks import release, try_lock
from service import create_app
from tests.conftest import client_of, mlflow_client
from tests.training_helpers import fitting_pid, slow_job, version_count, wait_done
from training import attempt, job_process
from training.attempt import AttemptOutcome, hard_time_limit


def answer_at_once(settings, job_id):
    return AttemptOutcome.SUCCEEDED


def test_a_lock_released_while_a_forked_child_keeps_the_file_open_is_free(tmp_path):
    path = tmp_path / "slot-0.lock"
    held = try_lock(path)
    child = os.fork()
    if child == 0:  # keeps its copy of the open file, as a pool's replacement worker does
        time.sleep(30)
        os._exit(0)
    try:
        release(held)
        again = try_lock(path)
        assert again is not None, "the lock is still held through the child's copy of the file"
        again.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_the_slot_is_free_once_the_attempt_answers_before_its_pool_is_taken_down(tmp_path, monkeypatch):
    monkeypatch.setattr(job_process, "run_attempt", answer_at_once)
    path = tmp_path / "slot-0.lock"
    slot = try_lock(path)
    seen, order = {}, []
    terminate = billiard.pool.Pool.terminate
    monkeypatch.setattr(billiard.pool.Pool, "terminate", lambda pool: (order.append("terminate"), terminate(pool))[1])

    def on_answer():
        order.append("answer")
        release(slot)
        other = try_lock(path)  # what the next job's process tries
        seen["free"] = other is not None
        if other is not None:
            other.close()

    settings = SimpleNamespace(TRAIN_TIME_LIMIT_SECONDS=60, TRAIN_MAX_ATTEMPTS=1)
    outcome = job_process.run_job(settings, "job-1", on_answer=on_answer)
    assert outcome is AttemptOutcome.SUCCEEDED
    assert seen == {"free": True}
    assert order == ["answer", "terminate"], "the slot waited for the pool to be taken down"


def test_a_process_forked_from_a_warm_parent_does_not_warm_up_again(monkeypatch):
    warm_ups = []
    monkeypatch.setattr(attempt, "_preloaded", False)
    monkeypatch.setattr(attempt, "_warm_up", lambda: warm_ups.append(os.getpid()))
    attempt.preload_training()  # the fork server, or a Celery worker's parent
    child = os.fork()
    if child == 0:  # a job's process: it calls preload_training again before its attempts fork from it
        attempt.preload_training()
        os._exit(len(warm_ups))
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 1, "the forked process warmed up again"
    assert warm_ups == [os.getpid()]


def test_an_attempt_stuck_where_the_soft_limit_cannot_reach_it_is_killed_at_the_hard_limit(store, app_config):
    """Frozen with SIGSTOP while it fits, the attempt is as deaf to the soft limit's signal as a C call that never
    returns to Python: the pool kills it at the hard limit (soft + 10 s), and the job's process records it."""
    app = create_app({**app_config, "TRAIN_TIME_LIMIT_SECONDS": 5, "TRAIN_MAX_ATTEMPTS": 1})
    client = client_of(app)
    before = version_count(store)
    location = client.post("/train", json=slow_job()).json["location"]
    tracking = mlflow_client(store["uri"])
    pid = fitting_pid(tracking, location.rsplit("/", 1)[1])
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    job = wait_done(client, location, timeout=60)
    assert job["status"] == "failed", job
    assert "time limit" in job["error"], job["error"]
    assert time.monotonic() - started < 40, "the stuck attempt outlived the hard limit by far"
    # The hard limit's kill, not the soft limit (which would end it near 5 s): the attempt ran until the hard one.
    assert job["elapsed_seconds"] >= hard_time_limit(5) - 1, job
    with pytest.raises(ProcessLookupError):  # killed, not left stopped
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    assert version_count(store) == before
    assert tracking.get_run(job["job_id"]).info.status == "FAILED"


def test_celerys_pool_replaces_a_job_process_that_closed_its_pipes_before_it_could_be_reaped(monkeypatch):
    """celery/celery#9588: Celery's pool looks once when a process's pipe closes, finds it not yet reaped, and
    waits for its 5 s timer; ours looks again every EXIT_POLL_SECONDS until it is reaped, then replaces it."""
    from celery.concurrency.asynpool import AsynPool

    from training.celery_executor import EXIT_POLL_SECONDS, PromptAsynPool

    calls = []
    monkeypatch.setattr(AsynPool, "_event_process_exit", lambda pool, hub, proc: calls.append("celery looked"))

    class Hub:
        def __init__(self):
            self.later = []

        def call_later(self, delay, callback):
            self.later.append((delay, callback))

    class Process:
        exitcode = None  # its pipes are closed; the kernel has not made it reapable yet

    pool = PromptAsynPool.__new__(PromptAsynPool)  # no processes: only the exit handling is under test
    pool.maintain_pool = lambda: calls.append("replaced")
    hub, process = Hub(), Process()
    pool._event_process_exit(hub, process)
    for _ in range(3):  # not reaped yet: it looks again, and again
        delay, look = hub.later.pop()
        assert delay == EXIT_POLL_SECONDS and calls == ["celery looked"]
        look()
    process.exitcode = 155  # billiard's "recycled" exit code
    hub.later.pop()[1]()
    assert calls == ["celery looked", "replaced"] and hub.later == []

    reaped = Process()
    reaped.exitcode = 155
    pool._event_process_exit(hub, reaped)  # reaped at the first look: Celery's own handling replaced it
    assert hub.later == []


def test_celery_workers_use_the_prompt_pool():
    from celery.concurrency import get_implementation

    from kernel.config import load_settings
    from training.celery_executor import PromptTaskPool, make_celery

    app = make_celery(load_settings({"TRAIN_EXECUTOR": "celery", "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"}))
    assert get_implementation(app.conf.worker_pool) is PromptTaskPool
