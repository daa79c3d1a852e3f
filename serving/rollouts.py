"""Rollouts as plain functions: start one, step or promote it, roll it back, cancel it, describe it.

The spec lives in MLflow (kernel/rollout_spec.py, kernel/rollout_registry.py); every instance reads it in
its alias poll, and this machine's workers through its pointer. Each call here reads the registry afresh,
changes MLflow, then has this machine follow at once (other instances follow within their poll).
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from kernel.errors import APIError
from kernel.registry import AliasState, ModelNotFound, Registry
from kernel.rollout_spec import Guardrails, RolloutSpec
from serving import rollout_decisions, rollout_metrics
from serving.loaded_model import LoadedModel
from serving.model_store import ModelStore
from serving.rollout_owner import merged_now, read_status
from serving.schemas import VersionField
from serving.versions import Versions

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")  # an HTTP header name (RFC 9110 token)
_FORBIDDEN_HEADERS = {"authorization", "cookie", "proxy-authorization"}
_DECIDING = ("step_min_requests", "step_min_seconds", "auto_promote", "auto_rollback")
EXAMPLE = {"candidate": {"name": "iris-RandomForestClassifier", "version": "2"}, "mode": "canary",
           "steps": [10, 50], "sticky": {"header": "X-User-Id", "missing": "stable"}}  # fmt: skip


class CandidateSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Length(min=1, max=256))
    version = VersionField()
    alias = fields.String(validate=validate.Length(min=1, max=256))

    @validates_schema
    def one_of_version_or_alias(self, data, **kwargs):
        if ("version" in data) == ("alias" in data):
            raise ValidationError("Give exactly one of 'version' or 'alias'.", "_schema")


class StickySchema(Schema):
    class Meta:
        unknown = RAISE

    header = fields.String(required=True)
    missing = fields.String(load_default="stable", validate=validate.OneOf(["stable", "random"]))

    @validates_schema
    def a_header_name(self, data, **kwargs):
        header = data.get("header", "")
        if not _TOKEN.match(header):
            raise ValidationError("Not an HTTP header name (letters, digits and -, up to 64).", "header")
        if header.lower() in _FORBIDDEN_HEADERS:
            raise ValidationError("Credentials never choose an arm: use another header.", "header")


class GuardrailsSchema(Schema):
    class Meta:
        unknown = RAISE

    max_error_rate_delta = fields.Float(validate=validate.Range(0, 1))
    max_p95_latency_ratio = fields.Float(validate=validate.Range(1, 100))
    min_agreement = fields.Float(validate=validate.Range(0, 1))
    max_prediction_psi = fields.Float(validate=validate.Range(0, 10))


class RolloutRequest(Schema):
    """POST /rollout: the candidate, the mode, its steps (canary) or share (shadow), and stickiness."""

    class Meta:
        unknown = RAISE

    candidate = fields.Nested(CandidateSchema, required=True)
    mode = fields.String(required=True, validate=validate.OneOf(["canary", "shadow"]))
    steps = fields.List(fields.Integer(strict=True, validate=validate.Range(1, 99)), validate=validate.Length(1, 20))
    shadow_percent = fields.Integer(strict=True, validate=validate.Range(1, 100))
    sticky = fields.Nested(StickySchema)
    step_min_requests = fields.Integer(strict=True, validate=validate.Range(1, 10_000_000))
    step_min_seconds = fields.Integer(strict=True, validate=validate.Range(0, 7 * 86400))
    guardrails = fields.Nested(GuardrailsSchema)
    auto_promote = fields.Boolean()
    auto_rollback = fields.Boolean()

    @validates_schema
    def steps_for_canary_only(self, data, **kwargs):
        steps = data.get("steps")
        if data.get("mode") == "canary":
            if "shadow_percent" in data:
                raise ValidationError("A canary takes 'steps', not 'shadow_percent'.", "shadow_percent")
            if not steps:
                raise ValidationError(
                    "A canary needs 'steps': increasing percents from 1 to 99, like [10, 50].", "steps"
                )
            if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
                raise ValidationError("Steps must increase, like [5, 25, 50].", "steps")
        elif data.get("mode") == "shadow" and steps is not None:
            raise ValidationError("A shadow takes 'shadow_percent', not 'steps'.", "steps")


def _running(alias: AliasState) -> RolloutSpec:
    if alias.rollout is None:
        raise APIError(409, "no_rollout", "No rollout is running. POST /rollout starts one.")
    return alias.rollout


def _incompatible(stable: LoadedModel, candidate: LoadedModel) -> dict | None:
    """What keeps the candidate from answering the stable version's requests (features or classes), or None."""
    kinds = {f.name: f.kind for f in stable.features}
    theirs = {f.name: f.kind for f in candidate.features}
    problems = {
        "missing_features": sorted(set(kinds) - set(theirs)),
        "extra_features": sorted(set(theirs) - set(kinds)),
        "mistyped_features": sorted(n for n in set(kinds) & set(theirs) if kinds[n] != theirs[n]),
        "missing_classes": sorted(map(str, set(stable.classes) - set(candidate.classes))),
        "extra_classes": sorted(map(str, set(candidate.classes) - set(stable.classes))),
    }
    return problems if any(problems.values()) else None


def start(registry: Registry, store: ModelStore, versions: Versions, request: dict) -> dict:
    """Start a rollout of `request["candidate"]` against the active version; raises APIError with the reason."""
    alias = registry.read_alias_state()
    if alias.rollout is not None:
        raise APIError(409, "rollout_running", f"Rollout {alias.rollout.id} is running; end it first.",
                       rollout_id=alias.rollout.id)  # fmt: skip
    wanted = request["candidate"]
    try:
        if "alias" in wanted:
            ref = registry.get_model_version_by_alias(wanted["name"], wanted["alias"])
        else:
            ref = registry.get_model_version(wanted["name"], wanted["version"])
    except ModelNotFound as exc:
        which = f"version {wanted['version']}" if "version" in wanted else f"alias {wanted['alias']!r}"
        raise APIError(404, "model_not_found", f"No registered model {wanted['name']!r} with {which}.") from exc
    if alias.active is None:
        raise APIError(
            409, "no_active_model", f"The alias {registry.alias!r} is {alias.status}: nothing to compare with."
        )
    if ref == alias.active:
        raise APIError(409, "candidate_active", f"{ref.name} version {ref.version} is already the active version.")
    stable = versions.by_version(alias.active.name, alias.active.version)
    candidate = versions.by_version(ref.name, ref.version)
    problems = _incompatible(stable, candidate)
    if problems:
        raise APIError(422, "incompatible_candidate", "The candidate cannot answer the active version's requests.",
                       **problems)  # fmt: skip
    sticky = request.get("sticky") or {}
    spec = RolloutSpec(
        id=uuid.uuid4().hex[:12], candidate=ref, stable=alias.active, mode=request["mode"],
        steps=tuple(request.get("steps") or ()),
        shadow_percent=request.get("shadow_percent", 100) if request["mode"] == "shadow" else 0,
        sticky_header=sticky.get("header"), missing=sticky.get("missing", "stable"),
        started_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"), step_started=time.time(),
        guardrails=Guardrails(**request.get("guardrails", {})),
        **{key: request[key] for key in _DECIDING if key in request},
    )  # fmt: skip
    spec = spec.with_state("running", spec.running_reason())
    spec = registry.start_rollout(spec)
    store.follow_registry()
    return describe(spec, store.state_dir)


def promote(registry: Registry, store: ModelStore) -> dict:
    """The next step; after the last (or for a shadow), the candidate becomes active (`promoted`)."""
    spec = _running(registry.read_alias_state())
    if spec.last_step:
        registry.end_rollout(spec, "promoted", "promoted by hand (POST /rollout/promote)")
        store.follow_registry()
        return {**describe(spec, store.state_dir), "state": "promoted"}
    spec = spec.next_step(time.time())
    registry.save_rollout(spec)
    store.follow_registry()
    return describe(spec, store.state_dir)


def end(registry: Registry, store: ModelStore, state: str, reason: str) -> dict:
    """Roll back or cancel: the stable version keeps serving, and the candidate's alias goes."""
    spec = _running(registry.read_alias_state())
    registry.end_rollout(spec, state, reason)
    store.follow_registry()
    return {**describe(spec, store.state_dir), "state": state, "reason": reason}


def describe(spec: RolloutSpec, state_dir: Path | None = None) -> dict:
    """The rollout, its state, step and percent, and its counts per arm: every instance's, merged from their
    reports (as this machine's polling worker last read them), and this instance's own."""
    own = rollout_metrics.counts(spec.id)
    status = read_status(state_dir, spec.id) if state_dir is not None else None
    counts = rollout_metrics.summary(merged_now(status, own))
    arms = counts["arms"]
    versus = rollout_decisions.versus(spec)
    return {
        "state": spec.state,
        "reason": spec.reason,
        "rollout": spec.as_dict(),
        "percent": spec.percent,
        "arms": arms,
        "shadow": counts["shadow"],
        "prediction_psi": rollout_metrics.class_psi(arms["stable"]["classes"], arms[versus]["classes"]),
        "counted_by": "this instance (all its workers): no report read yet"
        if status is None
        else f"every instance that reported ({status['instances_reported']})",
        "this_instance": rollout_metrics.summary(own)["arms"],
        "owner": (status or {}).get("owner"),
        "instances_reporting": (status or {}).get("instances_reporting", []),
        "last_decision": (status or {}).get("decision"),
    }


def current(store: ModelStore) -> dict:
    """GET /rollout: the running rollout as this machine last read it (its poll), or `none`."""
    store.get()
    spec = store.rollout
    if spec is None:
        return {"state": "none"}
    return describe(spec, store.state_dir)
