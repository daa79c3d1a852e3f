"""The process of one training job: `python -m training.worker <job folder> <run id> <slot fd>`.

It supervises: the training itself runs in a child process that is killed at the time limit, so a
job never outlives its limit even inside a long C call; whatever happens, the run ends marked
succeeded or failed, and a failed job leaves no registered version behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from pathlib import Path


def _registry():
    from serving.config import load_config
    from serving.registry import registry_from_config

    return registry_from_config(load_config())


def load_dataset(folder: Path):
    import pandas as pd

    from training.datasets import Dataset, _typed_features

    payload = json.loads((folder / "dataset.json").read_text())
    features = pd.DataFrame(payload["rows"], columns=payload["columns"])
    if payload["source"] == "builtin":
        features = features.astype("float64")
    else:
        features = _typed_features(features)
    labels = pd.Series(payload["labels"], name="target")
    return Dataset(payload["name"], features, labels, payload["source"], payload["digest"])


def _die_with_parent(supervisor: int) -> None:
    """Linux: if the supervisor is killed, the kernel kills this process too (it must not register).

    The supervisor may have died before the request reached the kernel: then it is already gone
    (this process has been re-parented) and this process stops at once.
    """
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != supervisor:
        os._exit(1)


def train(folder: str, run_id: str, supervisor: int) -> None:
    """The child: fit, evaluate, log and register inside the job's run, then mark it succeeded."""
    from training.job import TrainingSpec, run_training
    from training.jobs import fail_job, mark_job

    _die_with_parent(supervisor)
    registry = _registry()
    spec = json.loads((Path(folder) / "spec.json").read_text())
    try:
        dataset = load_dataset(Path(folder))
        training = TrainingSpec(spec["estimator"], spec["params"], spec["model_name"], spec["activate"])
        result = run_training(registry, training, dataset, run_id=run_id)
    except Exception as exc:
        traceback.print_exc()
        fail_job(registry, run_id, f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    mark_job(registry, run_id, "succeeded", activated=result["activated"], finished_at=time.time())


def main(folder: str, run_id: str, slot_fd: int) -> None:
    from training.jobs import fail_job, get_job, mark_job

    os.nice(10)  # training yields the CPU to the serving workers of the same machine
    registry = _registry()
    spec = json.loads((Path(folder) / "spec.json").read_text())
    mark_job(registry, run_id, "running", pid=os.getpid(), started_at=time.time())
    child = multiprocessing.get_context("fork").Process(target=train, args=(folder, run_id, os.getpid()), daemon=True)
    child.start()
    child.join(spec["time_limit"])
    if child.is_alive():
        child.kill()
        child.join()
        fail_job(registry, run_id, f"The job exceeded its time limit of {spec['time_limit']} seconds.")
    elif get_job(registry, run_id)["status"] not in ("succeeded", "failed"):
        fail_job(registry, run_id, f"The training process died (exit code {child.exitcode}).")
    shutil.rmtree(folder, ignore_errors=True)
    os.close(slot_fd)  # frees this machine's training slot (the kernel would on exit anyway)


if __name__ == "__main__":
    if os.fork():  # the launcher returns at once; the forked supervisor runs the job
        os._exit(0)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
