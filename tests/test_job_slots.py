"""A local job's slot is free for the next job as soon as its attempt has answered (training/job_process.py)."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

from kernel.locks import release, try_lock
from training import job_process
from training.attempt import AttemptOutcome


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
    seen = {}

    def on_answer():
        release(slot)
        other = try_lock(path)  # what the next job's process tries
        seen["free"] = other is not None
        if other is not None:
            other.close()

    settings = SimpleNamespace(TRAIN_TIME_LIMIT_SECONDS=60, TRAIN_MAX_ATTEMPTS=1)
    outcome = job_process.run_job(settings, "job-1", on_answer=on_answer)
    assert outcome is AttemptOutcome.SUCCEEDED
    assert seen == {"free": True}
