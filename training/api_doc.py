"""The training half's schemas in the OpenAPI document: a job and a training's result."""

from __future__ import annotations

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
                "enum": ["validating", "fitting", "evaluating", "converting", "registering", None],
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


def register_schemas(spec) -> None:
    """Add the Job and TrainResult schemas to the app's OpenAPI document (an APISpec)."""
    for name, schema in RESPONSE_SCHEMAS.items():
        spec.components.schema(name, schema)
