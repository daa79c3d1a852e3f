"""Which version answers a request while a rollout runs, and what each arm counts.

- `canary`: a request whose sticky key hashes under the current percent (or, without a key, per the
  spec's `missing` rule) is answered by the candidate. If the candidate cannot be loaded, raises, or
  rejects rows that the stable version scores, the stable version answers (`fallback`), and it counts as
  a candidate error: no client ever gets a candidate's failure.
- `shadow`: the stable version answers; a share of the requests is queued for the candidate to score
  afterwards (serving/shadow.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from kernel.rollout_spec import RolloutSpec
from serving import rollout_metrics
from serving.loaded_model import LoadedModel
from serving.prediction import BadInput, parse_rows, predict
from serving.shadow import Shadow

log = logging.getLogger(__name__)


def route(
    spec: RolloutSpec,
    stable: LoadedModel,
    key: str | None,
    load_candidate: Callable[[], LoadedModel],
    score: Callable[[LoadedModel], dict],
    shadow: Callable[[dict], None],
) -> tuple[LoadedModel, str, dict]:
    """(the model that answered, the route: `stable`, `candidate` or `fallback`, the answer).

    `score(model)` predicts this request's rows (BadInput for the client's own error); `shadow(answer)`
    queues the shadow's copy.
    """
    if spec.mode == "canary" and spec.on_candidate(key):
        started = time.perf_counter()
        try:
            candidate = load_candidate()
            result = score(candidate)
        except BadInput:
            result = score(stable)  # the stable version rejects it too: the client's error (400), no fallback
            rollout_metrics.record(spec.id, "candidate", "error")
            log.warning("rollout %s: the candidate rejected rows the stable version scores; stable answered", spec.id)
            return stable, "fallback", result
        except Exception as exc:
            log.warning("rollout %s: the candidate failed (%s); stable answered", spec.id, exc)
            result = score(stable)
            rollout_metrics.record(spec.id, "candidate", "error")
            return stable, "fallback", result
        seconds = time.perf_counter() - started
        rollout_metrics.record(spec.id, "candidate", "ok", seconds, result["predictions"], candidate.classes)
        return candidate, "candidate", result
    started = time.perf_counter()
    result = score(stable)
    rollout_metrics.record(
        spec.id, "stable", "ok", time.perf_counter() - started, result["predictions"], stable.classes
    )
    if spec.mode == "shadow":
        sampled = spec.on_candidate(key) if key is not None else random.random() * 100 < spec.percent  # noqa: S311
        if sampled:
            shadow(result)
    return stable, "stable", result


def shadow_scorer(load: Callable[[RolloutSpec], LoadedModel], max_rows: int, observe=None):
    """The shadow thread's scoring: the candidate's answer on the queued rows, and its classes. `observe` (the
    drift counter) hears the candidate's rows: its drift entry covers the shadowed share."""

    def score(spec: RolloutSpec, body: object) -> tuple[dict, tuple]:
        candidate = load(spec)
        return predict(candidate, body, max_rows, observe), tuple(candidate.classes)

    def score_many(spec: RolloutSpec, bodies: list) -> tuple[list[dict], tuple]:
        """Several requests' rows in one call, the answer split back per request."""
        candidate = load(spec)
        parts = [parse_rows(body, candidate.feature_names)[0] for body in bodies]
        answer = predict(
            candidate, {"records": [row for part in parts for row in part]}, max_rows * len(parts), observe
        )
        answers, start = [], 0
        for part in parts:
            end = start + len(part)
            answers.append({"predictions": answer["predictions"][start:end],
                            "probabilities": (answer.get("probabilities") or [])[start:end]})  # fmt: skip
            start = end
        return answers, tuple(candidate.classes)

    return score, score_many


def new_shadow(load: Callable[[RolloutSpec], LoadedModel], size: int, max_rows: int, observe=None,
               inline: bool = False, inline_budget_ms: float = 5.0, inline_sample: float = 0.1) -> Shadow:  # fmt: skip
    score, score_many = shadow_scorer(load, max_rows, observe)
    return Shadow(score, size, max_rows, inline, inline_budget_ms, inline_sample, score_many)
