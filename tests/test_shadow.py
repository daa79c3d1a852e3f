"""The shadow on Lambda (serving/shadow.py, inline): scored within the request, on a sample, only while the
candidate's median scoring time is under the budget; skipped and counted otherwise."""

from __future__ import annotations

import time
import uuid

from kernel.refs import ModelRef
from kernel.rollout_spec import RolloutSpec
from serving import rollout_metrics
from serving.shadow import Shadow

ANSWER = {"predictions": ["a", "b"], "probabilities": [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}]}


def spec() -> RolloutSpec:
    return RolloutSpec(uuid.uuid4().hex[:12], ModelRef("m", "2"), ModelRef("m", "1"), "shadow", shadow_percent=100)


def scorer(seconds: float, calls: list):
    def score(spec, body):
        calls.append(body)
        time.sleep(seconds)
        return {"predictions": ["a", "a"], "probabilities": [{"a": 0.8, "b": 0.2}, {"a": 0.6, "b": 0.4}]}, ("a", "b")

    return score


def test_inline_scores_within_the_request_and_counts_agreement_at_once():
    calls, rollout = [], spec()
    shadow = Shadow(scorer(0.0, calls), size=1, max_rows=10, inline=True, inline_budget_ms=50, inline_sample=1.0)
    assert all(shadow.submit(rollout, {"n": i}, 2, ANSWER) for i in range(5))
    assert len(calls) == 5  # no thread: done before submit returned
    counts = rollout_metrics.summary(rollout_metrics.counts(rollout.id))
    assert counts["arms"]["shadow"]["requests"] == 5 and counts["shadow"]["rows"] == 10
    assert counts["shadow"]["agreement"] == 0.5
    assert abs(counts["shadow"]["mean_probability_difference"] - (0.1 + 0.4) / 2) < 1e-9


def test_inline_skips_a_candidate_over_its_budget_and_counts_the_skips_but_still_probes():
    calls, rollout = [], spec()
    shadow = Shadow(scorer(0.012, calls), size=1, max_rows=10, inline=True, inline_budget_ms=5, inline_sample=1.0)
    submitted = [shadow.submit(rollout, {"n": i}, 2, ANSWER) for i in range(3 + 2 * Shadow.PROBE_EVERY)]
    assert len(calls) == 3 + 2 and submitted.count(True) == 5  # three to learn the median, then one probe in 50
    arm = rollout_metrics.summary(rollout_metrics.counts(rollout.id))["arms"]["shadow"]
    assert arm["dropped"] == 2 * Shadow.PROBE_EVERY - 2 and arm["requests"] == 5


def test_inline_scores_only_its_sample():
    calls, rollout = [], spec()
    shadow = Shadow(scorer(0.0, calls), size=1, max_rows=10, inline=True, inline_sample=0.1)
    for i in range(2000):
        shadow.submit(rollout, {"n": i}, 2, ANSWER)
    assert 120 <= len(calls) <= 280, len(calls)  # 10 % of 2,000, give or take 6 standard deviations
    assert rollout_metrics.summary(rollout_metrics.counts(rollout.id))["arms"]["shadow"]["dropped"] == 0


def test_the_thread_scores_its_backlog_in_one_call_and_a_bad_request_alone():
    """While the candidate scores one request, the next ones queue; they are scored in one call, and a batch
    the candidate cannot take is scored request by request, so only the bad request counts as an error."""
    import threading

    gate, calls, batches, rollout = threading.Event(), [], [], spec()
    candidate = {"predictions": ["a"], "probabilities": [{"a": 0.8, "b": 0.2}]}

    def score(spec, body):
        calls.append(body)
        gate.wait(10)
        if body.get("bad"):
            raise ValueError("unseen category")
        return candidate, ("a", "b")

    def score_many(spec, bodies):
        batches.append(len(bodies))
        if any(body.get("bad") for body in bodies):
            raise ValueError("unseen category")
        return [candidate] * len(bodies), ("a", "b")

    stable = {"predictions": ["a"], "probabilities": [{"a": 0.9, "b": 0.1}]}
    shadow = Shadow(score, size=64, max_rows=1000, score_many=score_many)
    assert shadow.submit(rollout, {"n": 0}, 1, stable)
    deadline = time.monotonic() + 10
    while not calls:  # the thread is scoring the first request, held at the gate
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i in range(1, 11):
        assert shadow.submit(rollout, {"n": i}, 1, stable)
    for i in range(11, 14):
        assert shadow.submit(rollout, {"n": i, "bad": i == 12}, 1, stable)
    gate.set()
    shadow.drain()
    # The first alone (a batch of one, timed); then the 13 queued ones in one call (one batch in 10 also times a
    # request alone: not this one), which fails on the bad one and is scored request by request.
    assert batches == [13], batches
    counts = rollout_metrics.summary(rollout_metrics.counts(rollout.id))
    assert counts["arms"]["shadow"]["requests"] == 14 and counts["arms"]["shadow"]["errors"] == 1
    assert counts["shadow"]["rows"] == 13 and counts["shadow"]["agreement"] == 1.0
