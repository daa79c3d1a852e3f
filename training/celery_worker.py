"""`make worker`: a Celery training worker on CELERY_BROKER_URL (`python -m training.celery_worker [celery args]`)."""

from __future__ import annotations

import sys

from kernel.config import load_settings
from kernel.registry import registry_from_settings
from training.attempt import configure_job_logging, preload_training
from training.celery_executor import make_celery
from training.job_keeper import start_keeper


def main(argv: list[str]) -> None:
    """Start the worker: TRAIN_WORKER_CONCURRENCY processes, prefetch 1, acks late, the time limits."""
    settings = load_settings({"TRAIN_EXECUTOR": "celery"})
    configure_job_logging(settings)  # the service's format; a job's lines carry its `job_id` (the task sets it)
    registry_from_settings(settings)  # MLflow's client bounds, in the environment the job processes inherit
    start_keeper(settings)  # before the warm-up (it needs none) and the pool: lost jobs are sent again in a minute
    preload_training()
    app = make_celery(settings)
    app.worker_main(["worker", "--loglevel=INFO", "--pool=prefork", "--queues", settings.TRAIN_QUEUE,
                     "--without-gossip", "--without-mingle", *argv])  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
