"""GET /metrics in Prometheus text format: requests, latencies by model version, predicted rows, jobs, the active model.

With gunicorn, `PROMETHEUS_MULTIPROC_DIR` (set by gunicorn.conf.py) makes every worker's counts add up.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from kernel.registry import ModelRef
from kernel.rollout_spec import STATES as ROLLOUT_STATES

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time to answer, by endpoint and the model version that answered (empty for requests without one)",
    ["endpoint", "model", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREDICTED_ROWS = Counter("predicted_rows_total", "Rows predicted, by model", ["model", "version"])
TRAINING_JOBS = Counter("training_jobs_total", "Training jobs that ended, by outcome", ["outcome"])
JOB_OUTCOMES = ("succeeded", "failed")
for _outcome in JOB_OUTCOMES:  # both series exist (at 0) before the first job ends, for dashboards and alerts
    TRAINING_JOBS.labels(_outcome)
# Versions get their own latency series up to this many per process; later ones share "other" (bounded labels).
MAX_MODEL_LABELS = 20
_model_labels: set[tuple[str, str]] = set()


def model_labels(ref) -> tuple[str, str]:
    """The (model, version) labels of a request's model: its own while few versions have been seen."""
    if ref is None:
        return "", ""
    labels = (ref.name, ref.version)
    if labels not in _model_labels and len(_model_labels) >= MAX_MODEL_LABELS:
        return "other", "other"
    _model_labels.add(labels)
    return labels


_children: dict = {}


def _child(metric, *labels: str):
    """The metric's child for these labels, looked up once: `labels()` takes a lock and builds a key each call.

    The label sets are bounded (URL rules, methods, statuses, registered versions), and so is this cache.
    """
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def instrument(app: Flask) -> None:
    """Time every request and count it by endpoint (the URL rule, so ids do not explode the labels)."""

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def record(response):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        _child(REQUESTS, endpoint, request.method, str(response.status_code)).inc()
        if "started" in g:
            _child(LATENCY, endpoint, *model_labels(g.get("model_ref"))).observe(time.perf_counter() - g.started)
        response.headers["X-Worker-Pid"] = str(os.getpid())  # which gunicorn worker answered
        return response


def warm_up(model: str, version: str) -> None:
    """Create this process's common metric series now (in multiprocess mode each opens a file) without counting."""
    for status in ("200", "400"):
        _child(REQUESTS, "/predict", "POST", status)
    _child(LATENCY, "/predict", *model_labels(ModelRef(model, version)))
    _child(PREDICTED_ROWS, model, version)


def count_predictions(model: str, version: str, rows: int) -> None:
    _child(PREDICTED_ROWS, model, version).inc(rows)


def count_training_job(outcome: str) -> None:
    """Count a training job that ended ("succeeded" or "failed"); works from a job's own process too,
    since gunicorn's processes and their children share PROMETHEUS_MULTIPROC_DIR."""
    TRAINING_JOBS.labels(outcome).inc()


ALIAS_STATES = ("ok", "missing", "conflict")


class ActiveModelCollector:
    """The version this process serves and the alias as this machine last read it, read when scraped.

    `active_model_info{model, version} 1`; `active_alias_state{alias, state} 1` for the state now (0 for
    the others: `conflict` means the alias is on two models); `active_alias_holder_info{alias, model,
    version} 1` per version carrying the alias (two or more in a conflict: their names); during a rollout,
    `rollout_running_info{rollout, mode, model, stable_version, candidate_version} 1` and
    `rollout_percent{rollout, mode}` and `rollout_state{rollout, state}` (1 for the state now).
    """

    def __init__(self, store):
        self.store = store

    def collect(self):
        family = GaugeMetricFamily(
            "active_model_info", "The model version being served (1)", labels=["model", "version"]
        )
        model = self.store.get() if self.store is not None else None
        if model is not None:
            family.add_metric([model.ref.name, model.ref.version], 1)
        yield family
        if self.store is None:
            return
        alias = self.store.alias_status()
        state = GaugeMetricFamily("active_alias_state", "The active alias: ok, missing or conflict (1 for the state now)",
                                  labels=["alias", "state"])  # fmt: skip
        for name in ALIAS_STATES:
            state.add_metric([alias["name"], name], 1 if alias["status"] == name else 0)
        yield state
        holders = GaugeMetricFamily("active_alias_holder_info", "The versions carrying the active alias (1 each)",
                                    labels=["alias", "model", "version"])  # fmt: skip
        for holder in alias["holders"]:
            holders.add_metric([alias["name"], holder["name"], holder["version"]], 1)
        yield holders
        rollout = getattr(self.store, "rollout", None)
        running = GaugeMetricFamily("rollout_running_info", "The rollout this machine follows (1), with both versions",
                                    labels=["rollout", "mode", "model", "stable_version", "candidate_version"])  # fmt: skip
        percent = GaugeMetricFamily("rollout_percent", "The candidate's share now: the canary's step, or the shadow's "
                                    "share (absent without a rollout)", labels=["rollout", "mode"])  # fmt: skip
        if rollout is not None:
            running.add_metric([rollout.id, rollout.mode, rollout.candidate.name, rollout.stable.version,
                                rollout.candidate.version], 1)  # fmt: skip
            percent.add_metric([rollout.id, rollout.mode], rollout.percent)
        yield running
        yield percent
        states = GaugeMetricFamily("rollout_state", "The rollout's state: running (deciding), passed (waiting for a "
                                   "promotion by hand) or held (a guardrail failed), 1 for the state now",
                                   labels=["rollout", "state"])  # fmt: skip
        for name in ROLLOUT_STATES if rollout is not None else ():
            states.add_metric([rollout.id, name], 1 if rollout.state == name else 0)
        yield states


@bp.get("/metrics")
def metrics():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        text = generate_latest()
    store = current_app.extensions.get("model_store")
    collectors = [ActiveModelCollector(store)] if store is not None else []
    collectors += current_app.extensions.get("metrics_collectors", [])  # computed at scrape (drift)
    if collectors:
        computed = CollectorRegistry()
        for collector in collectors:
            computed.register(collector)
        text += generate_latest(computed)
    return Response(text, mimetype=CONTENT_TYPE_LATEST)
