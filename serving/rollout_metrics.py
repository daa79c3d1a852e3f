"""A rollout's counts per arm, in Prometheus (merged across the workers of an instance), and read back for GET /rollout.

Arms: `stable` (the active version), `candidate` (a canary's share) and `shadow` (the candidate scoring
copies of stable answers). Outcomes: `ok`, `error` (a candidate that raised or could not score a row the
stable version scored: the client got the stable answer, `fallback`), `dropped` (a shadow request not
scored: its queue was full or the batch too large). Scoring time is bucketed finely enough for a p95.
"""

from __future__ import annotations

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


def record(rollout: str, arm: str, outcome: str, seconds: float | None = None, labels=None, classes=()) -> None:
    """One request of a rollout's arm; `labels`, the predicted labels, count per class (capped)."""
    REQUESTS.labels(rollout, arm, outcome).inc()
    if seconds is not None:
        SCORING.labels(rollout, arm).observe(seconds)
    if labels is not None:
        known = {str(c) for c in list(classes)[:MAX_CLASSES]}
        values, counts = np.unique(np.asarray([str(label) for label in labels]), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
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


def _p95(buckets: list[tuple[float, float]]) -> float | None:
    """The 95th percentile's bucket bound from cumulative (bound, count) pairs; None without requests."""
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    for bound, count in buckets:
        if count >= 0.95 * total:
            return bound
    return None


def summary(rollout: str) -> dict:
    """Per arm: requests, errors (fallbacks), drops, p95 scoring time, predicted classes; and shadow agreement."""
    arms = {arm: {"requests": 0, "errors": 0, "dropped": 0, "p95_seconds": None, "classes": {}} for arm in ARMS}
    buckets: dict[str, list] = {arm: [] for arm in ARMS}
    shadow = {"agree": 0.0, "disagree": 0.0, "difference": 0.0}
    for sample in _samples(rollout):
        arm = sample.labels.get("arm")
        if sample.name == "rollout_requests_total" and arm in arms:
            key = {"ok": "requests", "error": "errors", "dropped": "dropped"}[sample.labels["outcome"]]
            arms[arm][key] += int(sample.value)
            if key == "errors":
                arms[arm]["requests"] += int(sample.value)
        elif sample.name == "rollout_scoring_seconds_bucket" and arm in arms and sample.labels["le"] != "+Inf":
            buckets[arm].append((float(sample.labels["le"]), sample.value))
        elif sample.name == "rollout_predicted_class_total" and arm in arms:
            arms[arm]["classes"][sample.labels["class"]] = int(sample.value)
        elif sample.name == "rollout_shadow_rows_total":
            shadow[sample.labels["outcome"]] += sample.value
        elif sample.name == "rollout_shadow_probability_difference_total":
            shadow["difference"] += sample.value
    for arm in ARMS:
        arms[arm]["p95_seconds"] = _p95(buckets[arm])
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
