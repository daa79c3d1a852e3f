"""The training blueprint: POST /train and GET /train/jobs/<id>. Views only adapt HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Flask, current_app, request

from kernel.auth import require_token
from kernel.config import Settings, current_settings
from kernel.errors import APIError
from kernel.http import json_body
from kernel.registry import ModelRef, Registry
from training.spec import EXAMPLE_REQUEST
from training.submitter import ExecutorUnavailable, create_job, discard_job, get_job, mark_sent, wait_for_job

if TYPE_CHECKING:
    from training.schemas import TrainingRequest

bp = Blueprint("training", __name__)


def _registry():
    return current_app.extensions["registry"]


def read_train_request() -> TrainingRequest:
    """The validated request and its dataset, from a JSON body or a multipart CSV upload.

    Its parser (datasets, estimators) imports pandas and scikit-learn: on a worker's first /train, not at
    start, so a process that only serves compiled versions never loads them.
    """
    from training.schemas import InvalidTrainingRequest, parse_train_request

    upload = None
    if request.mimetype == "multipart/form-data":
        body = request.form.to_dict()
        file = request.files.get("file")
        upload = (file.stream, file.filename) if file is not None else None  # streamed: limits apply before a parse
    else:
        body = json_body(example=EXAMPLE_REQUEST)
        if not isinstance(body, dict):
            raise APIError(400, "invalid_training_request", "The training request is not valid; nothing was trained.",
                           errors={"body": ["A JSON object."]}, example=EXAMPLE_REQUEST)  # fmt: skip
    settings = current_settings()
    limits = {"max_rows": settings.TRAIN_MAX_ROWS, "max_columns": settings.TRAIN_MAX_COLUMNS}
    try:
        return parse_train_request(body, limits, upload, feedback_reader(settings))
    except InvalidTrainingRequest as exc:
        raise APIError(
            400, "invalid_training_request", exc.message, errors=exc.errors, example=EXAMPLE_REQUEST
        ) from exc


def feedback_reader(settings):
    """How a feedback source's rows are read: from the service's prediction log, once, as the request is accepted."""

    def read(source: dict, limits: dict):
        from training.datasets import DatasetError
        from training.feedback_data import feedback_dataset

        if not settings.PREDICTION_LOG:
            raise DatasetError({"dataset": "the prediction log is off (PREDICTION_LOG=off): no labelled traffic"})
        from kernel.prediction_db import database_url, make_engine

        engine = make_engine(database_url(settings))
        try:
            return feedback_dataset(source, engine, current_app.extensions["registry"], limits,
                                    settings.PERFORMANCE_MIN_LABELS)  # fmt: skip
        finally:
            engine.dispose()

    return read


def _catch_up(job: dict) -> None:
    """Read-your-writes: once a job answers `activated`, this machine serves its version (or a newer choice).

    Through the inference half's narrow hook (`app.extensions["catch_up"]`, absent in the training
    role): a GET may warm this machine's model; it never writes the job or the registry.
    """
    result = job.get("result") or {}
    catch_up = current_app.extensions.get("catch_up")
    if result.get("activated") and catch_up is not None:
        catch_up(ModelRef(**result["model"]))


@bp.post("/train")
@require_token
def train():
    """Queue a training job: 202 with its location, or 201 with the result when `wait` is true."""
    parsed = read_train_request()
    registry = _registry()
    settings = current_settings()
    celery = settings.TRAIN_EXECUTOR == "celery"
    queue = settings.TRAIN_QUEUE if celery else "local"
    job_id = create_job(registry, parsed.spec, parsed.dataset, settings.TRAIN_MAX_QUEUED, queue)
    try:
        current_app.extensions["train_executor"].send(job_id)
    except ExecutorUnavailable:
        discard_job(registry, job_id)
        raise
    if celery:  # what the workers' keeper reads (training/job_keeper.py); a local job has a lock file instead
        mark_sent(registry, job_id)
    location = f"/train/jobs/{job_id}"
    if not parsed.wait:
        return {"job_id": job_id, "status": "queued", "location": location}, 202, {"Location": location}
    job = wait_for_job(registry, job_id, settings.TRAIN_TIME_LIMIT_SECONDS + 60)
    if job["status"] not in ("succeeded", "failed"):  # still going: answer as if wait had not been asked
        return job, 202, {"Location": location}
    if job["status"] == "failed":
        raise APIError(422, "training_failed", f"The training job failed: {job.get('error')}", job=job)
    # This machine follows the registry before the 201 leaves (other instances follow by polling).
    _catch_up(job)
    return job["result"], 201, {"Location": location}


@bp.get("/train/jobs/<job_id>")
@require_token
def job_status(job_id: str):
    """The job's status, phase, times and attempt, and its result once it succeeded.

    Never writes the job or the registry; it may warm this machine's model (`_catch_up`).
    """
    job = get_job(_registry(), job_id)
    _catch_up(job)
    return job


def _executor(settings: Settings, registry: Registry):
    if settings.TRAIN_EXECUTOR == "celery":
        from training.celery_executor import CeleryExecutor

        return CeleryExecutor(settings)
    from training.local_executor import LocalExecutor

    return LocalExecutor(settings, registry)


def register_training(app: Flask, settings: Settings, registry: Registry) -> None:
    """Add the training endpoints and this machine's job executor to the app.

    The local executor's sweeper (jobs whose process died start again) runs where the registry
    watcher does: here unless WATCH_REGISTRY is off, and in each gunicorn worker after the fork.
    """
    executor = _executor(settings, registry)
    app.extensions["train_executor"] = executor
    if settings.WATCH_REGISTRY and hasattr(executor, "start_sweeper"):
        executor.start_sweeper()
    app.register_blueprint(bp)
