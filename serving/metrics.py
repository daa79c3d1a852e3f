"""GET /metrics in Prometheus text format: requests, latencies, predicted rows, swaps.

With gunicorn, `PROMETHEUS_MULTIPROC_DIR` (set by gunicorn.conf.py) makes every worker's counts add up.
"""

from __future__ import annotations

import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("http_requests_total", "HTTP requests by endpoint and status", ["endpoint", "method", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time to answer, by endpoint",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREDICTED_ROWS = Counter("predicted_rows_total", "Rows predicted, by model", ["model", "version"])


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
            _child(LATENCY, endpoint).observe(time.perf_counter() - g.started)
        response.headers["X-Worker-Pid"] = str(os.getpid())  # which gunicorn worker answered
        return response


def warm_up(model: str, version: str) -> None:
    """Create this process's common metric series now (in multiprocess mode each opens a file) without counting."""
    for status in ("200", "400"):
        _child(REQUESTS, "/predict", "POST", status)
    _child(LATENCY, "/predict")
    _child(PREDICTED_ROWS, model, version)


def count_predictions(model: str, version: str, rows: int) -> None:
    _child(PREDICTED_ROWS, model, version).inc(rows)


@bp.get("/metrics")
def metrics():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
