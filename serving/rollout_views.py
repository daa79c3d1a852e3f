"""The rollout blueprint: POST /rollout, GET /rollout, POST /rollout/promote, POST /rollout/rollback, DELETE /rollout. Thin."""

from __future__ import annotations

from flask import Blueprint, current_app

from kernel.auth import require_token
from kernel.http import load_body
from serving import rollouts

bp = Blueprint("rollouts", __name__)


def _parts():
    extensions = current_app.extensions
    return extensions["registry"], extensions["model_store"]


@bp.post("/rollout")
@require_token
def start_rollout():
    """Start a canary or a shadow of a candidate version against the active one."""
    request = load_body(rollouts.RolloutRequest(), example=rollouts.EXAMPLE)
    registry, store = _parts()
    return rollouts.start(registry, store, current_app.extensions["versions"], request), 201


@bp.get("/rollout")
def rollout_state():
    """The running rollout (as this machine's last poll read it), its percent and this instance's counts per arm."""
    return rollouts.current(current_app.extensions["model_store"])


@bp.post("/rollout/promote")
@require_token
def promote_rollout():
    """The next step of a canary; after its last step (or for a shadow), the candidate becomes active."""
    return rollouts.promote(*_parts())


@bp.post("/rollout/rollback")
@require_token
def rollback_rollout():
    """End the rollout: the stable version keeps serving (`rolled_back`)."""
    return rollouts.end(*_parts(), "rolled_back", "rolled back by hand (POST /rollout/rollback)")


@bp.delete("/rollout")
@require_token
def cancel_rollout():
    """End the rollout without a verdict (`cancelled`): the stable version keeps serving."""
    return rollouts.end(*_parts(), "cancelled", "cancelled by hand (DELETE /rollout)")


_JSON = "application/json"
_STATE = {
    "type": "object",
    "description": "`state` is `none` without a rollout; otherwise the spec, the percent and this instance's counts",
    "properties": {
        "state": {
            "type": "string",
            "enum": ["none", "running", "passed", "held", "promoted", "rolled_back", "cancelled"],
        },
        "reason": {"type": "string"},
        "rollout": {"type": "object"},
        "percent": {"type": "integer"},
        "arms": {"type": "object"},
        "shadow": {"type": "object"},
        "prediction_psi": {"type": "number", "nullable": True},
        "counted_by": {"type": "string"},
        "this_instance": {"type": "object"},
        "owner": {"type": "object", "nullable": True},
        "instances_reporting": {"type": "array", "items": {"type": "string"}},
        "last_decision": {"type": "object", "nullable": True},
    },
    "required": ["state"],
}


def _answer(description: str, schema) -> dict:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def document(spec) -> None:
    """Add /rollout and its controls to the app's OpenAPI document."""
    spec.components.schema("RolloutRequest", schema=rollouts.RolloutRequest)
    spec.components.schema("RolloutState", _STATE)
    no_rollout = _answer("no rollout runs (`no_rollout`)", "Error")
    unavailable = _answer("MLflow unreachable", "Error")
    start = {
        "summary": "Start a canary or a shadow of a candidate version against the active one",
        "requestBody": {
            "required": True,
            "content": {_JSON: {"schema": "RolloutRequest", "example": rollouts.EXAMPLE}},
        },
        "responses": {
            "201": _answer("started", "RolloutState"),
            "404": _answer("no such model, version or alias", "Error"),
            "409": _answer("a rollout runs, the candidate is active, or no version is active", "Error"),
            "422": _answer("the candidate has other features or classes (named)", "Error"),
            "503": _answer("MLflow unreachable, or the candidate cannot be loaded", "Error"),
        },
    }
    state = {"summary": "The running rollout and this instance's counts per arm",
             "responses": {"200": _answer("the rollout, or `none`", "RolloutState")}}  # fmt: skip
    cancel = {"summary": "Cancel the rollout: the stable version keeps serving",
              "responses": {"200": _answer("cancelled", "RolloutState"), "409": no_rollout, "503": unavailable}}  # fmt: skip
    spec.path("/rollout", operations={"post": start, "get": state, "delete": cancel})
    promote = {"summary": "The next step; after the last, the candidate becomes active",
               "responses": {"200": _answer("stepped or promoted", "RolloutState"), "409": no_rollout, "503": unavailable}}  # fmt: skip
    spec.path("/rollout/promote", operations={"post": promote})
    rollback = {"summary": "Roll back: the stable version keeps serving",
                "responses": {"200": _answer("rolled back", "RolloutState"), "409": no_rollout, "503": unavailable}}  # fmt: skip
    spec.path("/rollout/rollback", operations={"post": rollback})
