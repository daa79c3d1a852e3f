"""A rollout's decisions, as plain functions of its counts: merge the instances' reports, take the current
step's share, check the guardrails, and say what to do next, with the reason.

The counts are `rollout_metrics.counts` (one instance's) or their sum over every instance that reported
(`merge`). A step decides once its candidate arm has `step_min_requests` and it has run `step_min_seconds`:
it passes when every guardrail holds (the error-rate delta; the p95 ratio and the PSI of the arms' classes
once each arm has MIN_ARM_REQUESTS; a shadow's agreement). The error rate alone is also checked early, over
the whole rollout: once a 99 % Wilson bound puts the candidate's rate above the stable one's plus the delta,
it fails without waiting for the step's minimum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from kernel.rollout_spec import RolloutSpec
from serving.rollout_metrics import ARMS, BUCKETS, class_psi, p95

Z = 2.576  # a two-sided 99 % bound
EARLY_MIN_REQUESTS = 20  # the early error check waits for this many candidate requests
MIN_ARM_REQUESTS = 100  # the p95 ratio and the PSI need this many requests (rows) per arm
ACTIONS = ("wait", "step", "promote", "pass", "hold", "rollback")


def empty() -> dict:
    arms = {arm: {"requests": 0, "errors": 0, "dropped": 0, "buckets": [0] * len(BUCKETS), "classes": {}}
            for arm in ARMS}  # fmt: skip
    return {"arms": arms, "shadow": {"agree": 0, "disagree": 0, "difference": 0.0}}


def _combine(first: dict, second: dict, sign: int) -> dict:
    out = empty()
    for name, arm in out["arms"].items():
        a, b = first["arms"].get(name, {}), second["arms"].get(name, {})
        for key in ("requests", "errors", "dropped"):
            arm[key] = a.get(key, 0) + sign * b.get(key, 0)
        arm["buckets"] = [x + sign * y for x, y in zip(a.get("buckets") or arm["buckets"],
                                                         b.get("buckets") or arm["buckets"], strict=True)]  # fmt: skip
        classes = set(a.get("classes", {})) | set(b.get("classes", {}))
        arm["classes"] = {c: a.get("classes", {}).get(c, 0) + sign * b.get("classes", {}).get(c, 0) for c in classes}
    for key in out["shadow"]:
        out["shadow"][key] = first["shadow"].get(key, 0) + sign * second["shadow"].get(key, 0)
    return out


def merge(reports: Iterable[dict]) -> dict:
    """The sum of raw counts (each instance's latest report)."""
    total = empty()
    for report in reports:
        total = _combine(total, report, 1)
    return total


def minus(total: dict, baseline: dict | None) -> dict:
    """The counts since `baseline` (the totals when the current step began)."""
    return total if baseline is None else _combine(total, baseline, -1)


def wilson(errors: int, requests: int) -> tuple[float, float]:
    """The 99 % Wilson interval of an error rate (0, 1 without requests)."""
    if requests <= 0:
        return 0.0, 1.0
    rate = errors / requests
    centre = rate + Z * Z / (2 * requests)
    spread = Z * math.sqrt(rate * (1 - rate) / requests + Z * Z / (4 * requests * requests))
    scale = 1 + Z * Z / requests
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACTIONS
    reason: str
    metrics: dict = field(default_factory=dict)  # the step's figures, logged to the rollout's run


def versus(spec: RolloutSpec) -> str:
    """The arm compared with `stable`: the canary's `candidate`, or the `shadow`."""
    return "shadow" if spec.mode == "shadow" else "candidate"


def _rate(arm: dict) -> float:
    return arm["errors"] / arm["requests"] if arm["requests"] else 0.0


def step_started(spec: RolloutSpec) -> float:
    if spec.step_started:
        return spec.step_started
    try:
        return datetime.fromisoformat(spec.started_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def figures(spec: RolloutSpec, counts: dict) -> dict:
    """The step's figures: per arm requests, error rate and p95; their ratio, the PSI and the agreement."""
    stable, other = counts["arms"]["stable"], counts["arms"][versus(spec)]
    out = {"stable_requests": stable["requests"], "candidate_requests": other["requests"],
           "stable_error_rate": _rate(stable), "candidate_error_rate": _rate(other)}  # fmt: skip
    stable_p95, other_p95 = p95(stable["buckets"]), p95(other["buckets"])
    if stable_p95 and other_p95:
        out.update(stable_p95_seconds=stable_p95, candidate_p95_seconds=other_p95, p95_ratio=other_p95 / stable_p95)
    psi = class_psi(stable["classes"], other["classes"])
    if psi is not None:
        out["prediction_psi"] = psi
    rows = counts["shadow"]["agree"] + counts["shadow"]["disagree"]
    if spec.mode == "shadow" and rows:
        out["agreement"] = counts["shadow"]["agree"] / rows
    return out


def _failed(spec: RolloutSpec, reason: str, metrics: dict) -> Decision:
    return Decision("rollback" if spec.auto_rollback else "hold", reason, metrics)


def _early_failure(spec: RolloutSpec, total: dict) -> str | None:
    """Why the candidate's error rate over the whole rollout is already too high, or None."""
    stable, other = total["arms"]["stable"], total["arms"][versus(spec)]
    if other["requests"] < EARLY_MIN_REQUESTS:
        return None
    low, _ = wilson(other["errors"], other["requests"])
    limit = _rate(stable) + spec.guardrails.max_error_rate_delta
    if low <= limit:
        return None
    return (f"the candidate failed {other['errors']} of {other['requests']} requests ({_rate(other):.1%}; at least "
            f"{low:.1%} with 99 % confidence), over the stable version's {_rate(stable):.2%} plus "
            f"max_error_rate_delta {spec.guardrails.max_error_rate_delta}")  # fmt: skip


def _guardrail_failures(spec: RolloutSpec, step: dict, metrics: dict) -> list[str]:
    g, failures = spec.guardrails, []
    stable, other = step["arms"]["stable"], step["arms"][versus(spec)]
    delta = _rate(other) - _rate(stable)
    if delta > g.max_error_rate_delta:
        failures.append(f"error rate {_rate(other):.2%} against {_rate(stable):.2%} (delta {delta:.4f} > "
                        f"{g.max_error_rate_delta})")  # fmt: skip
    enough = min(stable["requests"], other["requests"]) >= MIN_ARM_REQUESTS
    if enough and metrics.get("p95_ratio", 0) > g.max_p95_latency_ratio:
        failures.append(f"p95 scoring time {metrics['candidate_p95_seconds'] * 1000:g} ms against "
                        f"{metrics['stable_p95_seconds'] * 1000:g} ms (ratio {metrics['p95_ratio']:.2f} > "
                        f"{g.max_p95_latency_ratio})")  # fmt: skip
    rows = min(sum(stable["classes"].values()), sum(other["classes"].values()))
    if rows >= MIN_ARM_REQUESTS and metrics.get("prediction_psi", 0) > g.max_prediction_psi:
        failures.append(f"prediction PSI {metrics['prediction_psi']:.3f} > {g.max_prediction_psi}")
    if spec.mode == "shadow" and metrics.get("agreement", 1.0) < g.min_agreement:
        failures.append(f"agreement {metrics['agreement']:.3f} < {g.min_agreement}")
    return failures


def decide(spec: RolloutSpec, total: dict, step: dict, now: float) -> Decision:
    """What the owner does now, given the rollout's merged counts (`total`) and its current step's (`step`)."""
    metrics = figures(spec, step)
    if spec.state != "running":
        return Decision("wait", spec.reason or spec.state, metrics)
    early = _early_failure(spec, total)
    if early:
        return _failed(spec, f"rolled back early: {early}" if spec.auto_rollback else f"held: {early}", metrics)
    name = f"step {spec.step + 1} of {len(spec.steps)} ({spec.percent} %)" if spec.mode == "canary" else "the shadow"
    requests, seconds = step["arms"][versus(spec)]["requests"], now - step_started(spec)
    if requests < spec.step_min_requests or seconds < spec.step_min_seconds:
        return Decision("wait", f"{name}: {requests} of {spec.step_min_requests} requests, "
                                f"{min(seconds, spec.step_min_seconds):.0f} of {spec.step_min_seconds} s", metrics)  # fmt: skip
    failures = _guardrail_failures(spec, step, metrics)
    if failures:
        return _failed(spec, f"{name} failed: " + "; ".join(failures), metrics)
    passed = f"{name} passed ({requests} requests, {seconds:.0f} s, every guardrail held)"
    if not spec.last_step:
        return Decision("step", passed, metrics)
    if spec.auto_promote:
        return Decision("promote", passed + ": promoted", metrics)
    return Decision("pass", passed + ": POST /rollout/promote promotes it", metrics)
