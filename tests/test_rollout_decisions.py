"""A rollout's decisions as plain functions (serving/rollout_decisions.py): merging reports, a step's share,
each guardrail, the early rollback, and what passing the last step does."""

from __future__ import annotations

import pytest

from kernel.refs import ModelRef
from kernel.rollout_spec import Guardrails, RolloutSpec
from serving import rollout_decisions as decisions
from serving.rollout_metrics import BUCKETS

NOW = 1_000_000.0


def spec(**fields) -> RolloutSpec:
    base = {"id": "r1", "candidate": ModelRef("m", "2"), "stable": ModelRef("m", "1"), "mode": "canary",
            "steps": (10, 50), "step_min_requests": 100, "step_min_seconds": 60, "step_started": NOW - 120}  # fmt: skip
    return RolloutSpec(**{**base, **fields})


def arm(requests=0, errors=0, seconds=0.002, classes=None) -> dict:
    """Counts of an arm whose every ok request took `seconds` (cumulative buckets, as Prometheus keeps them)."""
    scored = requests - errors
    buckets = [scored if bound >= seconds else 0 for bound in BUCKETS]
    return {"requests": requests, "errors": errors, "dropped": 0, "buckets": buckets,
            "classes": classes if classes is not None else {"a": scored // 2, "b": scored - scored // 2}}  # fmt: skip


def counts(stable=None, candidate=None, shadow_arm=None, agree=0, disagree=0) -> dict:
    out = decisions.empty()
    out["arms"].update({k: v for k, v in {"stable": stable, "candidate": candidate, "shadow": shadow_arm}.items() if v})
    out["shadow"].update(agree=agree, disagree=disagree)
    return out


def test_reports_merge_by_sum_and_a_baseline_leaves_the_steps_share():
    first, second = counts(arm(100, 1), arm(10)), counts(arm(50), arm(5, 1))
    total = decisions.merge([first, second])
    assert total["arms"]["stable"]["requests"] == 150 and total["arms"]["candidate"]["errors"] == 1
    assert total["arms"]["stable"]["buckets"][BUCKETS.index(0.002)] == 149
    assert total["arms"]["candidate"]["classes"] == {"a": 7, "b": 7}
    assert decisions.minus(total, first) == decisions.merge([second])


def test_a_step_waits_for_its_requests_and_seconds_then_steps():
    total = counts(arm(900), arm(99))
    waiting = decisions.decide(spec(), total, total, NOW)
    assert waiting.action == "wait" and "99 of 100 requests" in waiting.reason
    total = counts(arm(900), arm(100))
    young = decisions.decide(spec(step_started=NOW - 30), total, total, NOW)
    assert young.action == "wait" and "30 of 60 s" in young.reason
    passed = decisions.decide(spec(), total, total, NOW)
    assert passed.action == "step" and "step 1 of 2 (10 %) passed" in passed.reason
    assert passed.metrics["candidate_requests"] == 100 and passed.metrics["p95_ratio"] == 1.0


@pytest.mark.parametrize("auto_promote, action", [(True, "promote"), (False, "pass")])
def test_the_last_step_promotes_or_waits_as_passed(auto_promote, action):
    total = counts(arm(900), arm(200))
    decision = decisions.decide(spec(step=1, auto_promote=auto_promote), total, total, NOW)
    assert decision.action == action


@pytest.mark.parametrize(
    "step_counts, failure",
    [
        (counts(arm(900), arm(200, 2)), "error rate 1.00% against 0.00%"),
        (counts(arm(900, seconds=0.002), arm(200, seconds=0.005)), "ratio 2.50 > 1.5"),
        (counts(arm(900, classes={"a": 450, "b": 450}), arm(200, classes={"a": 190, "b": 10})), "prediction PSI"),
    ],
)
@pytest.mark.parametrize("auto_rollback, action", [(True, "rollback"), (False, "hold")])
def test_a_failed_guardrail_rolls_back_or_holds_with_the_reason(step_counts, failure, auto_rollback, action):
    decision = decisions.decide(spec(auto_rollback=auto_rollback), step_counts, step_counts, NOW)
    assert decision.action == action and failure in decision.reason, decision


def test_the_p95_ratio_and_psi_wait_for_a_hundred_requests_per_arm():
    slow_and_skewed = counts(arm(99, seconds=0.05, classes={"a": 99}), arm(150, seconds=0.5, classes={"b": 150}))
    assert decisions.decide(spec(), slow_and_skewed, slow_and_skewed, NOW).action == "step"


def test_a_shadow_needs_its_agreement():
    shadow = spec(mode="shadow", steps=(), shadow_percent=100)
    low = counts(arm(500), shadow_arm=arm(500), agree=400, disagree=100)
    decision = decisions.decide(shadow, low, low, NOW)
    assert decision.action == "rollback" and "agreement 0.800 < 0.95" in decision.reason
    high = counts(arm(500), shadow_arm=arm(500), agree=490, disagree=10)
    assert decisions.decide(shadow, high, high, NOW).action == "pass"


def test_a_failing_candidate_is_rolled_back_early_on_the_whole_rollouts_counts():
    # 20 % of the candidate's requests fall back: far below the step's minimum, the bound already says so.
    total = counts(arm(200), arm(30, 6))
    decision = decisions.decide(spec(step_min_requests=10_000), total, counts(arm(10), arm(2)), NOW)
    assert decision.action == "rollback" and decision.reason.startswith(
        "rolled back early: the candidate failed 6 of 30"
    )
    # One error in 30 is not enough evidence against a delta of 0.05 ...
    total = counts(arm(200), arm(30, 1))
    assert decisions.decide(spec(guardrails=Guardrails(max_error_rate_delta=0.05)), total, total, NOW).action == "wait"
    # ... and nothing is decided early before EARLY_MIN_REQUESTS, however bad.
    total = counts(arm(200), arm(decisions.EARLY_MIN_REQUESTS - 1, decisions.EARLY_MIN_REQUESTS - 1))
    assert decisions.decide(spec(), total, total, NOW).action == "wait"


def test_a_held_or_passed_rollout_waits_for_a_human():
    total = counts(arm(900), arm(200, 100))
    assert decisions.decide(spec(state="held", reason="x"), total, total, NOW).action == "wait"


def test_wilson_bounds_contain_the_rate():
    low, high = decisions.wilson(6, 30)
    assert 0.05 < low < 0.2 < high < 0.45
    assert decisions.wilson(0, 0) == (0.0, 1.0)


def test_a_spec_round_trips_and_a_newer_instances_fields_are_left_aside():
    original = spec(guardrails=Guardrails(max_prediction_psi=0.2), auto_promote=True, state="held", reason="r")
    assert RolloutSpec.from_json(original.to_json()) == original
    newer = {**original.as_dict(), "ramp": "linear", "guardrails": {"max_prediction_psi": 0.2, "max_cost": 3}}
    assert RolloutSpec.from_dict(newer) == original
    assert RolloutSpec.from_json('{"id": "x"}') is None  # not a spec: ignored, never obeyed
