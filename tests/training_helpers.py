"""Helpers of the POST /train tests (test_training.py, test_training_jobs.py)."""

from __future__ import annotations

import time


def version_count(store) -> int:
    return len(store["registry"].search_model_versions())


def wait_done(client, location: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.3)
    raise TimeoutError(location)


def slow_job(**extra) -> dict:
    return {"estimator": "GradientBoostingClassifier", "params": {"n_estimators": 300}, "dataset": "digits", **extra}


def fitting_pid(tracking, run_id: str) -> int:
    """The pid of the job's attempt, once its record says it is fitting."""
    deadline = time.monotonic() + 60
    while tracking.get_run(run_id).data.tags.get("job.phase") != "fitting":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return int(tracking.get_run(run_id).data.tags["job.pid"])
