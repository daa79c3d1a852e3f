"""Training jobs: each runs in its own process, its state kept in its MLflow run for any worker to read.

A job is an MLflow run of the service's experiment. Its tags say the job's status (queued, running,
succeeded, failed), its host, process id and deadline, and once it succeeded its model version; so
`GET /train/jobs/<id>` answers the same from every worker and every instance. The concurrency limit
is per machine: a job holds one of N lock files for its life, and the kernel frees it when the
process ends, whatever the way.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import RunStatus

from serving.config import PROJECT_ROOT
from serving.registry import ModelNotFound, ModelRef, Registry, _iso, translate_errors
from training.datasets import Dataset

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed")
# A job whose process vanished is noticed by its deadline, plus this margin for a slow shutdown.
DEADLINE_GRACE_SECONDS = 30


class TooManyJobs(Exception):
    """Every training slot of this machine is taken."""


class JobNotStarted(Exception):
    """The job's process could not be started; the job is recorded failed."""


class JobNotFound(Exception):
    """No training job with that id."""


def _slot(state_dir: Path, slots: int):
    """An open, locked slot file; TooManyJobs if all are held by running jobs."""
    folder = state_dir / "train-slots"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(slots):
        handle = open(folder / f"slot-{index}.lock", "a")  # noqa: SIM115 - handed to the job process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            handle.close()
    raise TooManyJobs(f"{slots} training jobs are already running on this machine")


def _save_dataset(dataset: Dataset, folder: Path) -> None:
    """The validated rows, as JSON, for the job process (never pickle)."""
    frame = dataset.features.astype(object).where(dataset.features.notna(), None)
    payload = {
        "name": dataset.name,
        "source": dataset.source,
        "digest": dataset.digest,
        "columns": list(frame.columns),
        "rows": frame.values.tolist(),
        "labels": dataset.labels.tolist(),
    }
    (folder / "dataset.json").write_text(json.dumps(payload))


def submit_job(registry: Registry, config: dict, request: dict, dataset: Dataset) -> dict:
    """Start a training job in its own process; returns the job as `GET /train/jobs/<id>` shows it."""
    slot = _slot(Path(config["STATE_DIR"]), config["TRAIN_MAX_CONCURRENT_JOBS"])
    try:
        limit = config["TRAIN_TIME_LIMIT_SECONDS"]
        spec = {
            "estimator": request["estimator"],
            "params": request.get("params", {}),
            "model_name": request.get("model_name"),
            "activate": request.get("activate", True),
            "time_limit": limit,
        }
        tags = {
            "job.status": "queued",
            "job.host": socket.gethostname(),
            "job.deadline": str(time.time() + limit + DEADLINE_GRACE_SECONDS),
            "job.request": json.dumps({**spec, "dataset": dataset.name}),
            "estimator": spec["estimator"],
            "dataset": dataset.name,
        }
        run = translate_errors(registry.client.create_run)(
            registry.get_experiment_id(), tags=tags, run_name=f"{dataset.name}-{spec['estimator']}"
        )
        run_id = run.info.run_id
        translate_errors(registry.client.update_run)(run_id, status=RunStatus.to_string(RunStatus.SCHEDULED))
        folder = Path(config["STATE_DIR"]) / "jobs" / run_id
        folder.mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps(spec))
        _save_dataset(dataset, folder)
        env = {**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri,
               "MLFLOW_EXPERIMENT_NAME": registry.experiment_name, "ACTIVE_ALIAS": registry.alias,
               "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
        with open(folder / "job.log", "w") as output:
            # The launcher forks the job's supervisor and exits at once, so the job belongs to no
            # serving worker: no zombie to reap, and a recycled worker does not take the job with it.
            try:
                subprocess.run(
                    [sys.executable, "-m", "training.worker", str(folder), run_id, str(slot.fileno())],
                    cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, check=True, timeout=30,
                    pass_fds=(slot.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except (subprocess.SubprocessError, OSError) as exc:
                fail_job(registry, run_id, f"The job process could not start: {exc}")
                raise JobNotStarted(str(exc)) from exc
    finally:
        slot.close()  # the job process holds its own copy of the lock now
    return {"job_id": run_id, "status": "queued", "location": f"/train/jobs/{run_id}"}


def mark_job(registry: Registry, run_id: str, status: str, **details) -> None:
    """Record a job's status in its run (and the run's own MLflow status, as the UI shows it)."""
    tags = {"job.status": status, **{f"job.{k}": str(v)[:5000] for k, v in details.items()}}
    for key, value in tags.items():
        registry.client.set_tag(run_id, key, value)
    if status == "running":
        registry.client.update_run(run_id, status="RUNNING")
    elif status in FINAL:
        registry.client.set_terminated(run_id, "FINISHED" if status == "succeeded" else "FAILED")


def remove_versions_of(registry: Registry, run_id: str) -> None:
    """A failed job registers nothing: delete any version its run registered before it died.

    If the job had already made its version active, the model that was active before comes back.
    """
    removed = set()
    for mv in registry.client.search_model_versions(f"run_id = '{run_id}'"):
        log.warning("removing %s version %s of failed job %s", mv.name, mv.version, run_id)
        removed.add(ModelRef(mv.name, str(mv.version)))
    if not removed:
        return
    previous = registry.client.get_run(run_id).data.tags.get("job.previous_active")
    if registry.get_active_model() in removed and previous:
        registry.set_active_model(ModelRef(**json.loads(previous)))
    for ref in removed:
        registry.client.delete_model_version(ref.name, ref.version)


def fail_job(registry: Registry, run_id: str, error: str) -> None:
    remove_versions_of(registry, run_id)
    mark_job(registry, run_id, "failed", error=error, finished_at=time.time())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A finished child of this process stays a zombie until reaped; it is not alive.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


@translate_errors
def get_job(registry: Registry, job_id: str) -> dict:
    """The job's state from its run; a job whose process is gone is reported (and recorded) failed."""
    if not (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
        raise JobNotFound(job_id)
    try:
        run = translate_errors(registry.client.get_run)(job_id)
    except ModelNotFound as exc:  # the registry's "no such resource", here a run
        raise JobNotFound(job_id) from exc
    tags = run.data.tags
    if "job.status" not in tags or run.info.experiment_id != registry.get_experiment_id():
        raise JobNotFound(job_id)
    status = tags["job.status"]
    if status not in FINAL:
        reason = None
        if time.time() > float(tags.get("job.deadline", "inf")):
            reason = "The job passed its time limit and its process is gone."
        elif tags.get("job.host") == socket.gethostname() and "job.pid" in tags and not _alive(int(tags["job.pid"])):
            reason = "The job's process ended without reporting a result (killed or crashed)."
        if reason:
            fail_job(registry, job_id, reason)
            return get_job(registry, job_id)
    request = json.loads(tags.get("job.request", "{}"))
    job = {
        "job_id": job_id,
        "status": status,
        "estimator": request.get("estimator"),
        "params": request.get("params"),
        "dataset": request.get("dataset"),
        "created_at": _iso(run.info.start_time),
        "location": f"/train/jobs/{job_id}",
    }
    if status == "succeeded":
        job["result"] = {
            "model": {"name": tags["model_name"], "version": tags["model_version"]},
            "run_id": job_id,
            "metrics": {k: v for k, v in run.data.metrics.items()},
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
