"""The training half's part of the OpenAPI document: /train, /train/jobs/<id>, a job and a training's result.

The composition root assembles the document (service/openapi.py); each half adds its own paths.
"""

from __future__ import annotations

from training.job_record import JOB_PHASES
from training.spec import EXAMPLE_REQUEST

_MODEL_REF = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
    "required": ["name", "version"],
}
_METRICS = {"type": "object", "additionalProperties": {"type": "number"}}
RESPONSE_SCHEMAS = {
    "TrainResult": {
        "type": "object",
        "properties": {
            "model": _MODEL_REF,
            "run_id": {"type": "string"},
            "metrics": _METRICS,
            "activated": {"type": "boolean"},
            "not_activated": {"type": "string", "description": "Why a job asked to activate did not (a rollout runs)."},
        },
        "required": ["model", "run_id", "metrics", "activated"],
    },
    "Job": {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
            "estimator": {"type": "string", "nullable": True},
            "params": {"type": "object", "nullable": True},
            "dataset": {"type": "string", "nullable": True},
            "created_at": {"type": "string", "nullable": True},
            "location": {"type": "string"},
            "waited_seconds": {"type": "number", "nullable": True, "description": "Time spent queued."},
            "attempt": {"type": "integer", "description": "Which attempt runs (or ran) the job; 2 after a lost one."},
            "worker": {"type": "string", "nullable": True, "description": "host:pid of the attempt's process."},
            "started_at": {"type": "string", "nullable": True},
            "finished_at": {"type": "string", "nullable": True},
            "elapsed_seconds": {"type": "number", "nullable": True},
            "phase": {
                "type": "string",
                "nullable": True,
                "enum": [*JOB_PHASES, None],
                "description": "What a running job does now.",
            },
            "phase_elapsed_seconds": {"type": "number", "nullable": True},
            "heartbeat_age_seconds": {
                "type": "number",
                "nullable": True,
                "description": "Seconds since the running attempt was last heard from (it beats every 5 s); "
                "past 30 s it is lost, and its job runs again or fails.",
            },
            "lost_attempt": {"type": "string", "description": "What happened to an earlier attempt that was lost."},
            "result": {"$ref": "#/components/schemas/TrainResult"},
            "error": {"type": "string", "description": "Why the job failed (status failed only)."},
        },
        "required": ["job_id", "status", "location"],
    },
}


def document(spec) -> None:
    """Add the training paths and their schemas (TrainRequest, TrainResult, Job) to the app's OpenAPI document."""
    from training.schemas import TrainRequest

    for name, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(name, schema)
    spec.components.schema("TrainRequest", schema=TrainRequest)
    spec.path("/train", operations={"post": _train_operation()})
    spec.path("/train/jobs/{job_id}", operations={"get": _job_operation()})


def _content(schema: str) -> dict:  # components registered by document()
    return {"content": {"application/json": {"schema": schema}}}


def _train_operation() -> dict:
    from training.estimators import describe_estimators

    error = _content("Error")
    return {
        "summary": "Train a classifier and register it as a new version",
        "description": "Estimators and their settable hyperparameters: "
        + "; ".join(f"{name}: {', '.join(params)}" for name, params in describe_estimators().items()),
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": "TrainRequest", "example": EXAMPLE_REQUEST},
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
            "422": {"description": "the job failed (with wait: true)", **error},
            "429": {"description": "TRAIN_MAX_QUEUED jobs already wait; see Retry-After", **error},
            "503": {"description": "MLflow or the training queue (broker) cannot be reached", **error},
        },
    }


def _job_operation() -> dict:
    error = _content("Error")
    return {
        "summary": "A training job's status, phase, wait and run times, and result",
        "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "the job", **_content("Job")},
            "404": {"description": "no such job", **error},
            "503": {"description": "MLflow unreachable", **error},
        },
    }
