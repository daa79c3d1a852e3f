"""Logs and metrics as an operator reads them: JSON lines from a gunicorn run, the dashboard's metrics in /metrics."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kernel.logs import make_formatter, redact, request_id_from
from service import create_app
from tests.conftest import DEFAULT_NAME, IRIS_ROW, ROOT
from tests.servers import Service

TOKEN = "observability-test-token-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("observability")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "API_TOKEN": TOKEN, "LOG_FORMAT": "json",
           "DRIFT_MIN_ROWS": "50", "PREDICTION_LOG_FLUSH_SECONDS": "0.2", "PERFORMANCE_REFRESH_SECONDS": "1"}  # fmt: skip
    service = Service(env, folder, workers=2).start()
    yield service
    service.stop()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_request_id_is_echoed_and_every_request_is_one_json_line(service):
    sent = f"test-{uuid.uuid4().hex}"
    answer = requests.post(f"{service.url}/predict", json=IRIS_ROW, headers={"X-Request-ID": sent}, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["X-Request-ID"] == sent
    generated = requests.get(f"{service.url}/health", timeout=30).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = requests.get(f"{service.url}/health", headers={"X-Request-ID": 'a"b<c>' + "d" * 500}, timeout=30)
    assert hostile.headers["X-Request-ID"] == "abc" + "d" * 125  # unsafe characters dropped, 128 at most
    # Secrets and bodies stay out of the log: a token in the header and the query, a distinctive field name.
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Request-ID": f"swap-{sent}"}
    swap = requests.post(f"{service.url}/use-model?token={TOKEN}", json={"name": DEFAULT_NAME, "version": "1"},
                         headers=headers, timeout=60)  # fmt: skip
    assert swap.status_code == 200, swap.text
    requests.post(f"{service.url}/predict", json={**IRIS_ROW, "body_field_never_logged": 1}, timeout=30)

    text = service.log_text()
    lines = json_lines(text)
    [line] = [line for line in lines if line.get("request_id") == sent and line["logger"] == "serving.access"]
    assert line["method"] == "POST" and line["path"] == "/predict" and line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert (line["model"], line["model_version"], line["model_route"]) == (
        DEFAULT_NAME,
        "1",
        answer.headers["X-Model-Route"],
    )
    assert line["level"] == "INFO" and line["time"].endswith("+00:00")
    [swapped] = [line for line in lines if line.get("request_id") == f"swap-{sent}" and "status" in line]
    assert swapped["path"] == "/use-model" and swapped["model_version"] == "1"
    assert any(line.get("request_id") == generated for line in lines)
    assert TOKEN not in text
    assert "body_field_never_logged" not in text
    # gunicorn's own lines are JSON too, and its plain access log is off.
    assert any(line["logger"] == "gunicorn.error" and "Booting worker" in line["message"] for line in lines)
    assert not re.search(r'"(GET|POST) /\S* HTTP/1\.1" \d{3}', text)


def test_log_lines_inside_a_request_carry_its_id(app):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for existing in logging.getLogger().handlers:
        if getattr(existing, "_serving_handler", False):
            handler.addFilter(existing.filters[0])
    logging.getLogger().addHandler(handler)
    try:
        app.test_client().post("/predict", json={"records": [IRIS_ROW], "params": {"x": 1}},
                               headers={"X-Request-ID": "inside-1"})  # fmt: skip
    finally:
        logging.getLogger().removeHandler(handler)
    inside = [r for r in records if r.name == "serving.mlflow_protocol"]
    assert inside and all(r.request_id == "inside-1" for r in inside)


def test_text_format_and_redaction():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "to %s", ("postgresql://u:hunter2@db/x",), None)
    record.request_id = "r-1"
    assert "[request_id=r-1]" in make_formatter("text").format(record)
    assert json.loads(make_formatter("json").format(record))["request_id"] == "r-1"
    assert redact("postgresql://u:hunter2@db/x Bearer abc.def", ("s3cret",)) == "postgresql://u:***@db/x Bearer ***"
    assert redact("token s3cret here", ("s3cret",)) == "token *** here"
    assert request_id_from("") != request_id_from("")
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        create_app({"LOG_FORMAT": "yaml", "START_MODEL_STORE": False})


# ---- dashboard and alerts -------------------------------------------------------------------------------
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}  # fmt: skip


def queried_metrics(expr: str) -> dict[str, set[str]]:
    """Metric names an expression reads, each with the label names its matchers use."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string values
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name, matchers = match.group(1), match.group(2) or ""
        after = expr[match.end(1) :].lstrip()
        if name in PROMQL_WORDS or after.startswith("(") or re.match(r"(by|without)\b", after):
            continue  # a keyword, a function or an aggregation
        if re.search(r"(by|without|on|ignoring)\s*\([^)]*$", expr[: match.start()]):
            continue  # a label list: by (le, model)
        if re.search(r"\[[^\]]*$", expr[: match.start()]) or name.startswith("$"):
            continue  # a range [5m] or a Grafana variable
        found.setdefault(name, set()).update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return found


def monitoring_queries() -> list[str]:
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            queries.append(rule["expr"])
    return queries


def test_queries_are_parsed_as_expected():
    assert queried_metrics('sum by (le, model) (rate(x_bucket{endpoint=~"/a|/b"}[5m])) / sum(y)') == {
        "x_bucket": {"endpoint"},
        "y": set(),
    }


def test_every_metric_the_dashboard_and_alerts_query_is_exported(service):
    requests.post(f"{service.url}/predict", json=IRIS_ROW, timeout=30)
    # Enough rows for the drift distances (DRIFT_MIN_ROWS=50): their gauges are exported from then on.
    batch = requests.post(f"{service.url}/predict", json={"records": [IRIS_ROW] * 60}, timeout=30)
    assert batch.status_code == 200
    # Live accuracy is exported once labels came back and the machine's refresh ran (every second here).
    labels = [{"prediction_id": i, "label": "setosa"} for i in batch.json()["prediction_ids"]]
    deadline = time.monotonic() + 60
    while "model_live_accuracy{" not in requests.get(f"{service.url}/metrics", timeout=30).text:
        requests.post(f"{service.url}/feedback", json={"feedback": labels}, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30)  # fmt: skip
        assert time.monotonic() < deadline, service.log_tail()
        time.sleep(0.5)
    # A rollout's series exist once one runs: a second version, shadowed for a few requests.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    trained = requests.post(f"{service.url}/train", json={"estimator": "GaussianNB", "dataset": "iris", "wait": True,
                            "model_name": DEFAULT_NAME, "activate": False}, headers=auth, timeout=300)  # fmt: skip
    assert trained.status_code == 201, trained.text
    shadow = {"candidate": trained.json()["model"], "mode": "shadow", "shadow_percent": 100}
    assert requests.post(f"{service.url}/rollout", json=shadow, headers=auth, timeout=60).status_code == 201
    queried: dict[str, set[str]] = {}
    for query in monitoring_queries():
        for name, used in queried_metrics(query).items():
            queried.setdefault(name, set()).update(used)
    assert {"http_requests_total", "http_request_duration_seconds_bucket", "training_jobs_total",
            "active_model_info", "model_feature_psi", "model_prediction_psi", "model_drift_rows"} <= set(queried)  # fmt: skip
    try:
        for _ in range(5):
            assert requests.post(f"{service.url}/predict", json=IRIS_ROW, timeout=30).status_code == 200
        # Series made asynchronously (the shadow's thread scores in batches; each worker's drift counts reach the
        # others' scrapes at its next flush) are waited for, on whichever worker answers, for at most 30 s.
        deadline = time.monotonic() + 30
        while True:
            text = requests.get(f"{service.url}/metrics", timeout=30).text
            labels: dict[str, set[str]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels.setdefault(sample.name, set()).update(sample.labels)
            missing = sorted({*queried, "rollout_shadow_rows_total"} - set(labels))
            if not missing:
                break
            assert time.monotonic() < deadline, f"queried but not in /metrics: {missing}\n{service.log_tail()}"
            time.sleep(0.2)
    finally:
        requests.delete(f"{service.url}/rollout", headers=auth, timeout=60)
    for name, used in queried.items():
        assert used <= labels[name], f"{name}: labels {used - labels[name]} are queried but not exported"
    # Latency by model version: the prediction's series carries the version that answered.
    assert re.search(rf'http_request_duration_seconds_bucket\{{endpoint="/predict",le="[^"]+",model="{DEFAULT_NAME}",version="1"\}}', text) or \
        re.search(rf'http_request_duration_seconds_bucket\{{endpoint="/predict",model="{DEFAULT_NAME}",version="1",le="[^"]+"\}}', text)  # fmt: skip
    assert f'active_model_info{{model="{DEFAULT_NAME}",version="1"}} 1.0' in text
    assert 'training_jobs_total{outcome="failed"}' in text


def test_job_lines_carry_the_job_id():
    """A job's process (`set_job_id`, as both executors call it): its lines, a thread's included, carry the id;
    after `set_job_id(None)` (the Celery task between jobs) they do not."""
    from kernel.logs import configure_logging, set_job_id

    root = logging.getLogger()
    configure_logging("json")
    handler = next(h for h in root.handlers if getattr(h, "_serving_handler", False))

    def line(message: str) -> dict:
        record = logging.LogRecord("training", logging.INFO, __file__, 1, message, (), None)
        handler.filter(record)
        return json.loads(handler.format(record))

    try:
        set_job_id("job-42")
        assert line("fitting")["job_id"] == "job-42"
        from_thread: list[dict] = []
        thread = threading.Thread(target=lambda: from_thread.append(line("from a thread")))
        thread.start()
        thread.join()
        assert from_thread[0]["job_id"] == "job-42"
        set_job_id(None)
        assert "job_id" not in line("between jobs")
    finally:
        set_job_id(None)
