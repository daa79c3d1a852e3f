"""A rollout's counts per arm, in Prometheus (merged across the workers of an instance), and read back for GET /rollout.

Arms: `stable` (the active version), `candidate` (a canary's share) and `shadow` (the candidate scoring
copies of stable answers). Outcomes: `ok`, `error` (a candidate that raised or could not score a row the
stable version scored: the client got the stable answer, `fallback`), `dropped` (a shadow request not
scored: its queue was full or the batch too large). Scoring time is bucketed finely enough for a p95.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

ARMS = ("stable", "candidate", "shadow")
OUTCOMES = ("ok", "error", "dropped")
MAX_CLASSES = 20  # predicted-class series per arm; further classes count as "other"
BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
           0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)  # fmt: skip

REQUESTS = Counter("rollout_requests_total", "Requests of a rollout by arm and outcome", ["rollout", "arm", "outcome"])
SCORING = Histogram("rollout_scoring_seconds", "Scoring time of a rollout's arms", ["rollout", "arm"], buckets=BUCKETS)
CLASSES = Counter("rollout_predicted_class_total", "Rows predicted per class by a rollout's arms", ["rollout", "arm", "class"])  # fmt: skip
SHADOW_ROWS = Counter("rollout_shadow_rows_total", "Shadow rows compared: agree or disagree with the stable label", ["rollout", "outcome"])  # fmt: skip
SHADOW_DIFFERENCE = Counter("rollout_shadow_probability_difference_total", "Sum over shadow rows of the mean absolute difference of the probabilities", ["rollout"])  # fmt: skip


@functools.lru_cache(maxsize=64)
def _known(classes: tuple) -> frozenset:
    """The classes counted by name (the first MAX_CLASSES); the others count as `other`."""
    return frozenset(str(c) for c in classes[:MAX_CLASSES])


def _tally(labels) -> dict:
    """Rows per predicted label: a dict for small batches (one row is the common case), numpy for large ones."""
    if len(labels) <= 64:
        tally: dict = {}
        for label in labels:
            key = label if isinstance(label, str) else str(label)
            tally[key] = tally.get(key, 0) + 1
        return tally
    values, counts = np.unique(np.asarray([str(label) for label in labels]), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def record(rollout: str, arm: str, outcome: str, seconds: float | None = None, labels=None, classes=(),
           requests: int = 1) -> None:  # fmt: skip
    """`requests` of a rollout's arm; `labels`, the predicted labels, count per class (capped)."""
    REQUESTS.labels(rollout, arm, outcome).inc(requests)
    if seconds is not None:
        SCORING.labels(rollout, arm).observe(seconds)
    if labels is not None:
        known = _known(tuple(classes))
        for value, count in _tally(labels).items():
            CLASSES.labels(rollout, arm, value if value in known else "other").inc(count)


def record_shadow(rollout: str, agree: int, disagree: int, difference: float) -> None:
    SHADOW_ROWS.labels(rollout, "agree").inc(agree)
    SHADOW_ROWS.labels(rollout, "disagree").inc(disagree)
    SHADOW_DIFFERENCE.labels(rollout).inc(difference)


def _samples(rollout: str) -> list:
    """This instance's samples of the rollout's metrics, every worker's merged."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = DEFAULT_REGISTRY
    return [s for family in registry.collect() if family.name.startswith("rollout_")
            for s in family.samples if s.labels.get("rollout") == rollout]  # fmt: skip


def p95(cumulative: list[float]) -> float | None:
    """The 95th percentile's bucket bound from cumulative counts aligned with BUCKETS; None without requests."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    for bound, count in zip(BUCKETS, cumulative, strict=False):
        if count >= 0.95 * total:
            return bound
    return None  # beyond the last bound


def counts(rollout: str) -> dict:
    """This instance's raw counts of the rollout (what it reports to the rollout's run, and what merges):
    per arm, requests (errors included), errors, drops, cumulative scoring-time counts per bound of BUCKETS
    and predicted classes; and the shadow's agreeing and disagreeing rows and summed probability difference."""
    arms = {arm: {"requests": 0, "errors": 0, "dropped": 0, "buckets": [0] * len(BUCKETS), "classes": {}}
            for arm in ARMS}  # fmt: skip
    index = {bound: i for i, bound in enumerate(BUCKETS)}
    shadow = {"agree": 0, "disagree": 0, "difference": 0.0}
    for sample in _samples(rollout):
        arm = arms.get(sample.labels.get("arm", ""))
        if sample.name == "rollout_requests_total" and arm is not None:
            key = {"ok": "requests", "error": "errors", "dropped": "dropped"}[sample.labels["outcome"]]
            arm[key] += int(sample.value)
            if key == "errors":
                arm["requests"] += int(sample.value)
        elif sample.name == "rollout_scoring_seconds_bucket" and arm is not None:
            bound = index.get(float(sample.labels["le"]))
            if bound is not None:
                arm["buckets"][bound] += int(sample.value)
        elif sample.name == "rollout_predicted_class_total" and arm is not None:
            arm["classes"][sample.labels["class"]] = arm["classes"].get(sample.labels["class"], 0) + int(sample.value)
        elif sample.name == "rollout_shadow_rows_total":
            shadow[sample.labels["outcome"]] += int(sample.value)
        elif sample.name == "rollout_shadow_probability_difference_total":
            shadow["difference"] += sample.value
    return {"arms": arms, "shadow": shadow}


def summary(raw: dict) -> dict:
    """Raw counts (one instance's, or merged) as GET /rollout shows them: per arm, requests, errors
    (fallbacks), drops, p95 scoring time and predicted classes; and the shadow's agreement."""
    arms = {name: {"requests": arm["requests"], "errors": arm["errors"], "dropped": arm["dropped"],
                   "p95_seconds": p95(arm["buckets"]), "classes": dict(arm["classes"])}
            for name, arm in raw["arms"].items()}  # fmt: skip
    shadow = raw["shadow"]
    rows = shadow["agree"] + shadow["disagree"]
    agreement = {"rows": int(rows), "agreement": shadow["agree"] / rows if rows else None,
                 "mean_probability_difference": shadow["difference"] / rows if rows else None}  # fmt: skip
    return {"arms": arms, "shadow": agreement}


def class_psi(first: dict[str, int], second: dict[str, int]) -> float | None:
    """The population stability index between two arms' predicted classes (None until both have rows)."""
    keys = sorted(set(first) | set(second))
    a = np.asarray([first.get(k, 0) for k in keys], dtype=float)
    b = np.asarray([second.get(k, 0) for k in keys], dtype=float)
    if not keys or a.sum() == 0 or b.sum() == 0:
        return None
    p, q = (a + 0.5) / (a + 0.5).sum(), (b + 0.5) / (b + 0.5).sum()  # a half count: no empty cell is infinite
    return float(np.sum((p - q) * np.log(p / q)))
