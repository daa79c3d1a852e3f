"""A rollout as it lives in MLflow: the spec every instance reads in its alias poll, the sticky arm rule, and
the `AliasState` that poll gives (the active alias's holders, with the rollout).

A rollout tries a candidate version beside the stable one (the holder of `ACTIVE_ALIAS`):
- `canary`: a share of the requests (the current step's percent) is answered by the candidate;
- `shadow`: every answer comes from the stable version, and the candidate scores a share of the same
  rows afterwards, off the request path, to be compared.

The spec is a registered-model tag (`ROLLOUT_TAG`) on the candidate's model, and the candidate version
carries `ROLLOUT_ALIAS`: the same search of the registered models that reads the active alias reads both.
The arm of a request with a key (the sticky header's value) is a hash of (rollout id, key) into one of
`BUCKETS` buckets: the same on every worker, instance and Lambda environment, with no shared state; a
bucket under the percent goes to the candidate, so a key on the candidate at 5 % stays there at 25 %.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields

from kernel.refs import ModelRef

ROLLOUT_TAG = "serving.rollout"  # registered-model tag: the running rollout's spec (JSON)
STATE_TAG = "rollout.state"  # model-version tags on the candidate: how its rollout ended, and why
REASON_TAG = "rollout.reason"
BUCKETS = 10_000
MODES = ("canary", "shadow")
END_STATES = ("promoted", "rolled_back", "cancelled", "overridden")


STATES = ("running", "passed", "held")  # a running rollout: deciding, its last step passed (waiting for a
# promotion by hand), or a guardrail failed without `auto_rollback` (waiting for a human; traffic stays as it is)


@dataclass(frozen=True)
class Guardrails:
    """What a step must hold to pass (the candidate's arm against the stable one's, over the step's requests)."""

    max_error_rate_delta: float = 0.005  # the candidate's error (fallback) rate minus the stable's
    max_p95_latency_ratio: float = 1.5  # the candidate's p95 scoring time over the stable's (100 requests per arm)
    min_agreement: float = 0.95  # a shadow's share of rows whose label equals the stable answer's
    max_prediction_psi: float = 0.1  # the PSI between the arms' predicted classes (100 rows per arm)


@dataclass(frozen=True)
class RolloutSpec:
    """One rollout: its id, both versions, the mode, the steps (canary) or the shadow share, and stickiness."""

    id: str
    candidate: ModelRef
    stable: ModelRef
    mode: str
    steps: tuple[int, ...] = ()
    step: int = 0  # index into steps
    shadow_percent: int = 0
    sticky_header: str | None = None
    missing: str = "stable"  # without a key: `stable` or `random`
    started_at: str = ""
    run_id: str | None = None  # the rollout's MLflow run
    step_min_requests: int = 1000  # a step decides once its candidate arm has this many requests...
    step_min_seconds: int = 300  # ... and it has run this long
    guardrails: Guardrails = field(default_factory=Guardrails)
    auto_promote: bool = False  # after the last step passes: promote (True) or wait as `passed` for a human
    auto_rollback: bool = True  # a failed guardrail: roll back (True) or hold as `held` for a human
    state: str = "running"  # `running`, `passed` or `held` (STATES)
    reason: str = ""  # why it is in that state (the last decision)
    step_started: float = 0.0  # when the current step began (epoch seconds; 0: at the start)

    @property
    def percent(self) -> int:
        """The candidate's share now: the current step (canary) or the shadow share."""
        return self.steps[self.step] if self.mode == "canary" else self.shadow_percent

    @property
    def last_step(self) -> bool:
        return self.mode == "shadow" or self.step >= len(self.steps) - 1

    def next_step(self, now: float) -> RolloutSpec:
        """The next step, deciding again from `now`."""
        step = min(self.step + 1, len(self.steps) - 1)
        moved = replace(self, step=step, step_started=now)
        return replace(moved, state="running", reason=moved.running_reason())

    def running_reason(self) -> str:
        """What a running rollout says before its step's decision: the step, or the shadow's share."""
        if self.mode == "shadow":
            return f"shadowing {self.shadow_percent} % of the requests"
        return f"step {self.step + 1} of {len(self.steps)}"

    def with_state(self, state: str, reason: str) -> RolloutSpec:
        return replace(self, state=state, reason=reason)

    def on_candidate(self, key: str | None) -> bool:
        """Whether a request with this sticky key (None: no key) goes to the candidate's arm."""
        if key is None:
            if self.missing != "random":
                return False
            return random.random() * 100 < self.percent  # noqa: S311 - a traffic share, not a secret
        digest = hashlib.blake2b(f"{self.id}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % BUCKETS < self.percent * (BUCKETS // 100)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["candidate"], data["stable"] = self.candidate.as_dict(), self.stable.as_dict()
        data["steps"] = list(self.steps)
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> RolloutSpec:
        """The spec; ValueError, KeyError or TypeError if it is not one. Fields this version does not know (a spec
        written by a newer instance during a rolling deploy) are left aside, not a reason to ignore the rollout."""
        known = {f.name for f in dataclass_fields(cls)}
        fields = {key: value for key, value in data.items() if key in known}
        fields.update(candidate=ModelRef(**data["candidate"]), stable=ModelRef(**data["stable"]))
        fields["steps"] = tuple(int(step) for step in data.get("steps", ()))
        limits = {f.name for f in dataclass_fields(Guardrails)}
        fields["guardrails"] = Guardrails(**{k: v for k, v in data.get("guardrails", {}).items() if k in limits})
        spec = cls(**fields)
        if spec.mode not in MODES or (spec.mode == "canary" and not spec.steps) or spec.state not in STATES:
            raise ValueError(f"not a rollout spec: {data!r}")
        return spec

    @classmethod
    def from_json(cls, text: str) -> RolloutSpec | None:
        """The spec a tag holds; None if it does not parse (a hand-edited tag is ignored, not obeyed)."""
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class AliasState:
    """One read of the registry: the versions carrying the active alias (one: ok; none: missing; more: conflict).

    The same read carries the running rollout (`rollout`), and a rollout whose aliases were moved by hand
    (`overridden`: its spec is still in MLflow, but the active alias is no longer on its stable version or
    the rollout alias no longer on its candidate). Neither takes part in comparisons."""

    holders: tuple[ModelRef, ...] = ()
    models: int = field(
        default=0, compare=False
    )  # registered models seen by the read: 0 is an empty registry (the default model's cue)
    rollout: RolloutSpec | None = field(default=None, compare=False)
    overridden: tuple[RolloutSpec, ...] = field(default=(), compare=False)

    @property
    def status(self) -> str:
        """`ok`, `missing` or `conflict`."""
        return "ok" if len(self.holders) == 1 else "missing" if not self.holders else "conflict"

    @property
    def active(self) -> ModelRef | None:
        """The version that serves: the one holder, or None when the alias is missing or in conflict."""
        return self.holders[0] if len(self.holders) == 1 else None
