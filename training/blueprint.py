"""The training blueprint: POST /train and GET /train/jobs/<id>. Views only adapt HTTP."""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, request
from marshmallow import ValidationError

from serving.auth import require_token
from serving.errors import APIError, registry_unavailable
from serving.registry import RegistryUnavailable
from serving.requests import json_body
from training.datasets import DatasetError, from_csv, from_records, load_builtin
from training.estimators import validate_params
from training.jobs import JobNotFound, JobNotStarted, TooManyJobs, get_job, submit_job, wait_for_job
from training.schemas import load_train_request

bp = Blueprint("training", __name__)

EXAMPLE = {"estimator": "RandomForestClassifier", "params": {"n_estimators": 200}, "dataset": "wine"}


def _registry():
    return current_app.extensions["registry"]


def _limits() -> dict:
    return {"max_rows": current_app.config["TRAIN_MAX_ROWS"], "max_columns": current_app.config["TRAIN_MAX_COLUMNS"]}


def _bad(errors: dict, message: str = "The training request is not valid; nothing was trained.") -> APIError:
    return APIError(400, "invalid_training_request", message, errors=errors, example=EXAMPLE)


def _unavailable(exc: Exception) -> APIError:
    return registry_unavailable(exc, "nothing was trained")


def read_train_request() -> tuple[dict, object]:
    """The validated request and its dataset, from a JSON body or a multipart CSV upload."""
    upload = request.files.get("file") if request.mimetype == "multipart/form-data" else None
    if request.mimetype == "multipart/form-data":
        body = request.form.to_dict()
    else:
        body = json_body(example=EXAMPLE)
        if not isinstance(body, dict):
            raise _bad({"body": ["A JSON object."]})
    try:
        parsed = load_train_request(body, uploaded_file=upload is not None)
        parsed["params"] = validate_params(parsed["estimator"], parsed["params"])
        if "dataset" in parsed:
            dataset = load_builtin(parsed["dataset"])
        elif upload is not None:
            dataset = from_csv(upload.read(), parsed["target"], _limits(), upload.filename or "upload.csv")
        else:
            dataset = from_records(parsed["data"], parsed["target"], _limits())
    except ValidationError as exc:
        raise _bad(exc.messages) from exc
    except DatasetError as exc:
        raise _bad(exc.errors, f"The data cannot be trained on: {exc}") from exc
    return parsed, dataset


@bp.post("/train")
@require_token
def train():
    """Start a training job: 202 with its location, or 201 with the result when `wait` is true."""
    parsed, dataset = read_train_request()
    registry = _registry()
    try:
        job = submit_job(registry, current_app.config, parsed, dataset)
    except TooManyJobs as exc:
        raise APIError(429, "too_many_jobs", f"{exc}; try again later.", headers={"Retry-After": "30"}) from exc
    except JobNotStarted as exc:
        raise APIError(503, "job_not_started", "The training process could not be started; nothing was trained.",
                       headers={"Retry-After": "30"}) from exc  # fmt: skip
    except RegistryUnavailable as exc:
        raise _unavailable(exc) from exc
    if not parsed["wait"]:
        return job, 202, {"Location": job["location"]}
    try:
        job = wait_for_job(registry, job["job_id"], current_app.config["TRAIN_TIME_LIMIT_SECONDS"] + 60)
    except RegistryUnavailable as exc:
        raise _unavailable(exc) from exc
    if job["status"] not in ("succeeded", "failed"):  # still going: answer as if wait had not been asked
        return job, 202, {"Location": job["location"]}
    if job["status"] == "failed":
        raise APIError(422, "training_failed", f"The training job failed: {job.get('error')}", job=job)
    result = job["result"]
    store = current_app.extensions.get("model_store")
    if result["activated"] and store is not None:
        # This machine follows the registry before the 201 leaves (other instances follow by polling);
        # if a /use-model moved it since, that newer choice is what this machine serves.
        store.follow_registry()
    return result, 201, {"Location": job["location"]}


@bp.get("/train/jobs/<job_id>")
def job_status(job_id: str):
    """The job's status (queued, running, succeeded, failed) and, once it succeeded, its result."""
    try:
        return get_job(_registry(), job_id)
    except JobNotFound as exc:
        raise APIError(404, "job_not_found", f"No training job {job_id!r}.") from exc
    except RegistryUnavailable as exc:
        raise _unavailable(exc) from exc


def register_training(app: Flask) -> None:
    """Add the training endpoints to the app and to its OpenAPI document."""
    app.register_blueprint(bp)
    app.extensions.setdefault("openapi_extenders", []).append(_document)


def _document(spec) -> None:
    from training.estimators import describe_estimators
    from training.schemas import TrainRequest

    spec.components.schema("TrainRequest", schema=TrainRequest)

    def _content(schema: str) -> dict:  # Job and TrainResult are components of serving/docs.py
        return {"content": {"application/json": {"schema": schema}}}

    error = _content("Error")
    spec.path(
        "/train",
        operations={
            "post": {
                "summary": "Train a classifier and register it as a new version",
                "description": "Estimators and their settable hyperparameters: "
                + "; ".join(f"{name}: {', '.join(params)}" for name, params in describe_estimators().items()),
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": "TrainRequest", "example": EXAMPLE},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "target": {"type": "string"},
                                    "estimator": {"type": "string"},
                                    "params": {"type": "string", "description": "JSON object"},
                                    "model_name": {"type": "string"},
                                    "activate": {"type": "boolean"},
                                    "wait": {"type": "boolean"},
                                },  # fmt: skip
                                "required": ["file", "target", "estimator"],
                            }
                        },
                    },
                },
                "responses": {
                    "201": {"description": "trained (with wait: true)", **_content("TrainResult")},
                    "202": {"description": "job queued; poll its Location", **_content("Job")},
                    "400": {"description": "bad request; nothing trained", **error},
                    "401": {"description": "token missing or wrong", **error},
                    "422": {"description": "the job failed (with wait: true)", **error},
                    "429": {"description": "too many jobs running; see Retry-After", **error},
                    "503": {"description": "MLflow unreachable or the job process did not start", **error},
                },
            }
        },
    )
    spec.path(
        "/train/jobs/{job_id}",
        operations={
            "get": {
                "summary": "A training job's status and result",
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the job", **_content("Job")},
                    "404": {"description": "no such job", **error},
                    "503": {"description": "MLflow unreachable", **error},
                },
            }
        },
    )
