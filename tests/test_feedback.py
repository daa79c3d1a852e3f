"""The prediction log, ground truth and live accuracy, in one process on the embedded store (serving/prediction_log.py,
serving/feedback.py): ids on every answer, rows recorded, labels applied, and figures equal to scikit-learn's."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from kernel.config import ConfigError
from service import create_app
from tests.conftest import DEFAULT_NAME, IRIS_ROW, TOKEN, client_of

CLASSES = ["setosa", "versicolor", "virginica"]
PERFORMANCE = f"/models/{DEFAULT_NAME}/versions/1/performance"


@pytest.fixture
def log_app(app_config, store, tmp_path):
    store["registry"].set_active_model(store["default"])
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    app = create_app({**app_config, "PREDICTION_LOG_URL": url, "PREDICTION_LOG_FLUSH_SECONDS": 0.1})
    app.config["db_url"] = url
    yield app
    app.extensions["model_store"].stop()


def rows(count: int, seed: int) -> list[dict]:
    generator = random.Random(seed)
    names = list(IRIS_ROW)
    return [{n: round(generator.uniform(0.1, 7.5), 1) for n in names} for _ in range(count)]


def logged_rows(app) -> list:
    app.extensions["prediction_log"].flush()  # what is queued is written
    engine = sa.create_engine(app.config["db_url"])
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT id, request_id, model, version, route, prediction, label FROM predictions")
        ).all()
    engine.dispose()
    return found


def test_every_answered_row_gets_an_id_and_is_recorded_without_its_inputs(log_app):
    client = client_of(log_app)
    sent, answers = [], []
    for index in range(30):
        body = {"records": rows(1 + index % 4, index)}
        answer = client.post("/predict", json=body, headers={"X-Request-ID": f"req-{index}"})
        assert answer.status_code == 200
        ids = answer.get_json()["prediction_ids"]
        assert len(ids) == len(body["records"]) == len(answer.get_json()["predictions"])
        sent.extend(ids)
        answers.append(answer.get_json())
    large = client.post("/predict", json={"records": rows(240, 99)}, headers={"X-Request-ID": "req-large"}).get_json()
    sent.extend(large["prediction_ids"])  # written as columns (prediction_log.LARGE_ROWS), not rows
    assert len(set(sent)) == len(sent) and len(large["prediction_ids"]) == 240
    by_url = client.post(f"/models/{DEFAULT_NAME}/versions/1/predict", json=IRIS_ROW).get_json()["prediction_ids"]
    recorded = {row.id: row for row in logged_rows(log_app)}
    assert set(recorded) == {*sent, *by_url}
    first = recorded[answers[0]["prediction_ids"][0]]
    assert (first.request_id, first.model, first.version, first.route) == ("req-0", DEFAULT_NAME, "1", "active")
    assert first.prediction == answers[0]["predictions"][0] and first.label is None
    assert recorded[by_url[0]].route == "version"
    for index in (0, 117, 239):
        row = recorded[large["prediction_ids"][index]]
        assert (row.request_id, row.route, row.prediction) == ("req-large", "active", large["predictions"][index])
    engine = sa.create_engine(log_app.config["db_url"])  # no column holds a feature's value
    columns = {column["name"] for column in sa.inspect(engine).get_columns("predictions")}
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT inputs, out_of_range FROM predictions")).all()
    engine.dispose()
    assert not columns & set(IRIS_ROW)
    assert {inputs for inputs, _ in stored} == {None}  # PREDICTION_LOG_INPUTS is off by default
    assert {flag for _, flag in stored} == {0, 1}  # the out-of-range flag is kept either way


def test_live_accuracy_equals_scikit_learns_on_the_same_labels(log_app):
    client = client_of(log_app)
    generator = random.Random(7)
    predicted, ids = [], []
    for index in range(40):
        answer = client.post("/predict", json={"records": rows(5, 100 + index)}).get_json()
        predicted += answer["predictions"]
        ids += answer["prediction_ids"]
    logged_rows(log_app)
    truth = [label if generator.random() < 0.7 else generator.choice(CLASSES) for label in predicted[:150]]
    items = [{"prediction_id": i, "label": t} for i, t in zip(ids[:150], truth, strict=True)]
    applied = client.post("/feedback", json={"feedback": items}).get_json()
    assert applied == {"accepted": 150, "updated": 0, "unknown_ids": [], "invalid": []}
    # Again for ten of them, with other labels: the last label wins, counted as updated.
    truth[:10] = [CLASSES[(CLASSES.index(t) + 1) % 3] for t in truth[:10]]
    again = client.post("/feedback", json={"feedback": [{"prediction_id": i, "label": t} for i, t in zip(ids[:10], truth[:10], strict=True)]})  # fmt: skip
    assert again.get_json()["updated"] == 10
    figures = client.get(f"{PERFORMANCE}?window=1d").get_json()
    guessed = predicted[:150]
    assert figures["status"] == "ok" and figures["labelled_rows"] == 150 and figures["predicted_rows"] >= 200
    assert figures["accuracy"] == pytest.approx(accuracy_score(truth, guessed))
    assert figures["f1_macro"] == pytest.approx(f1_score(truth, guessed, average="macro"))
    precision = precision_score(truth, guessed, labels=CLASSES, average=None, zero_division=0)
    recall = recall_score(truth, guessed, labels=CLASSES, average=None, zero_division=0)
    for index, label in enumerate(CLASSES):
        assert figures["per_class"][label]["precision"] == pytest.approx(precision[index])
        assert figures["per_class"][label]["recall"] == pytest.approx(recall[index])
    assert figures["confusion_matrix"] == {
        "labels": CLASSES,
        "matrix": confusion_matrix(truth, guessed, labels=CLASSES).tolist(),
    }
    assert figures["holdout"]["accuracy"] > 0.8
    assert 0 <= figures["label_lag_seconds"]["p50"] <= figures["label_lag_seconds"]["p90"] < 600
    # The same figures in /metrics, once this machine's refresh has run (every PERFORMANCE_REFRESH_SECONDS).
    prediction_log = log_app.extensions["prediction_log"]
    prediction_log._next_refresh = 0
    prediction_log._refresh_performance()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    ours = {s.name: s.value for name in ("model_live_accuracy", "model_labelled_rows", "model_holdout_accuracy",
            "model_live_f1_macro", "model_accuracy_alert_floor") for s in families[name].samples
            if s.labels["model"] == DEFAULT_NAME}  # fmt: skip
    # The alert's floor: hold-out minus PERFORMANCE_ALERT_DROP (0.05), exported with 150 >= 50 labelled rows.
    assert ours["model_accuracy_alert_floor"] == pytest.approx(figures["holdout"]["accuracy"] - 0.05)
    assert ours["model_live_accuracy"] == pytest.approx(accuracy_score(truth, guessed))
    assert ours["model_live_f1_macro"] == pytest.approx(f1_score(truth, guessed, average="macro"))
    assert ours["model_labelled_rows"] == 150 and ours["model_holdout_accuracy"] == figures["holdout"]["accuracy"]
    # And on the version's MLflow run, where data scientists look: the same figures, the time as the step.
    registry = log_app.extensions["registry"]
    run_id = registry.client.get_model_version(DEFAULT_NAME, "1").run_id
    logged = {key: registry.client.get_metric_history(run_id, key)[-1]
              for key in ("live_accuracy", "live_f1_macro", "labelled_rows")}  # fmt: skip
    assert logged["live_accuracy"].value == pytest.approx(ours["model_live_accuracy"])
    assert logged["live_f1_macro"].value == pytest.approx(ours["model_live_f1_macro"])
    assert logged["labelled_rows"].value == 150
    assert abs(logged["live_accuracy"].step - time.time()) < 120


def test_feedback_says_what_it_did_with_each_item(log_app):
    client = client_of(log_app)
    ids = client.post("/predict", json={"records": rows(3, 1)}).get_json()["prediction_ids"]
    logged_rows(log_app)
    body = {"feedback": [{"prediction_id": ids[0], "label": "setosa"}, {"prediction_id": ids[1], "label": "rose"},
                         {"prediction_id": "0000000000000000ff", "label": "setosa"}]}  # fmt: skip
    answer = client.post("/feedback", json=body).get_json()
    assert answer["accepted"] == 1 and answer["unknown_ids"] == ["0000000000000000ff"]
    assert [item["prediction_id"] for item in answer["invalid"]] == [ids[1]] and "setosa" in answer["invalid"][0][
        "reason"
    ]
    csv = f"prediction_id,label\n{ids[0]},virginica\n{ids[2]},versicolor\n"
    answer = client.post("/feedback", data=csv, headers={"Content-Type": "text/csv"})
    assert answer.get_json() == {"accepted": 1, "updated": 1, "unknown_ids": [], "invalid": []}
    labels = {row.id: row.label for row in logged_rows(log_app)}
    assert (labels[ids[0]], labels[ids[1]], labels[ids[2]]) == ("virginica", None, "versicolor")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "feedback"),
        ({"feedback": []}, "feedback"),
        ({"feedback": "x"}, "feedback"),
        ({"feedback": [{"prediction_id": "a"}]}, "label"),
        ({"feedback": [{"label": "setosa"}]}, "prediction_id"),
        ({"feedback": [{"prediction_id": "a", "label": "setosa", "extra": 1}]}, "extra"),
        ({"feedback": [{"prediction_id": "a", "label": True}]}, "label"),
        ({"feedback": [{"prediction_id": "a", "label": "setosa"}] * 6}, "feedback"),
    ],
)
def test_bad_feedback_is_rejected_naming_the_field_and_changes_nothing(app_config, store, tmp_path, body, field):
    store["registry"].set_active_model(store["default"])
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    app = create_app({**app_config, "PREDICTION_LOG_URL": url, "FEEDBACK_MAX_ITEMS": 5})
    client = client_of(app)
    ids = client.post("/predict", json=IRIS_ROW).get_json()["prediction_ids"]
    app.extensions["prediction_log"].flush()
    answer = client.post("/feedback", json=body)
    assert answer.status_code == 400 and answer.get_json()["error"] == "invalid_request"
    assert field in str(answer.get_json()["errors"])
    assert client.post("/feedback", json={"feedback": [{"prediction_id": ids[0], "label": "setosa"}]},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401  # fmt: skip
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM predictions WHERE label IS NOT NULL")).scalar() == 0
    engine.dispose()
    app.extensions["model_store"].stop()


def test_performance_needs_a_good_window_a_version_and_enough_labels(log_app):
    client = client_of(log_app)
    client.post("/predict", json=IRIS_ROW)
    for window in ("7", "30m", "0h", "31d", "1w", ""):
        answer = client.get(f"{PERFORMANCE}?window={window}")
        assert answer.status_code == 400 and "window" in answer.get_json()["message"], window
    assert client.get(f"{PERFORMANCE}?size=1").status_code == 400
    assert client.get(f"/models/{DEFAULT_NAME}/versions/99/performance").status_code == 404
    answer = client.get(f"{PERFORMANCE}?window=12h").get_json()
    assert answer["status"] == "insufficient_labels" and "PERFORMANCE_MIN_LABELS" in answer["message"]
    assert "accuracy" not in answer


def test_rows_older_than_the_retention_are_deleted_and_newer_ones_kept(log_app):
    client = client_of(log_app)
    kept = client.post("/predict", json={"records": rows(3, 5)}).get_json()["prediction_ids"]
    prediction_log = log_app.extensions["prediction_log"]
    prediction_log.flush()
    engine = sa.create_engine(log_app.config["db_url"])
    with engine.begin() as connection:  # 2,500 rows predicted 31 days ago: over two batches of 1,000
        connection.execute(sa.text(
            "INSERT INTO predictions (id, request_id, created_at, model, version, route, runtime, prediction) "
            "VALUES (:id, 'old', :at, 'm', '1', 'active', 'onnx', 'setosa')"),
            [{"id": f"old{i}", "at": datetime.now(UTC).replace(tzinfo=None) - timedelta(days=31)} for i in range(2500)])  # fmt: skip
    prediction_log._next_retention = 0  # its turn now, rather than in 10 minutes
    prediction_log._apply_retention()
    with engine.connect() as connection:
        left = {row.id for row in connection.execute(sa.text("SELECT id FROM predictions"))}
    engine.dispose()
    assert left == set(kept)


def test_with_the_log_off_answers_carry_no_ids_and_feedback_says_so(app_config, store):
    store["registry"].set_active_model(store["default"])
    app = create_app({**app_config, "PREDICTION_LOG": "off"})
    client = client_of(app)
    assert "prediction_ids" not in client.post("/predict", json=IRIS_ROW).get_json()
    answer = client.post("/feedback", json={"feedback": [{"prediction_id": "a", "label": "setosa"}]})
    assert answer.status_code == 409 and answer.get_json()["error"] == "prediction_log_off"
    assert client.get("/health").get_json()["prediction_log"]["status"] == "off"
    app.extensions["model_store"].stop()


def test_an_unreachable_database_never_fails_a_prediction(app_config, store):
    """A database that cannot be reached: the start goes on, predictions answer, rows are dropped and counted,
    and /health says degraded, with the reason."""
    from serving.prediction_log import DROPPED

    store["registry"].set_active_model(store["default"])
    closed = "postgresql+psycopg2://nobody@127.0.0.1:9/none"  # port 9 (discard): nothing listens
    app = create_app({**app_config, "PREDICTION_LOG_URL": closed, "PREDICTION_LOG_FLUSH_SECONDS": 0.1})
    client = client_of(app)
    assert client.get("/health").get_json()["prediction_log"]["status"] == "degraded"
    before = DROPPED.labels("database")._value.get()
    started = time.monotonic()
    for _ in range(20):
        assert client.post("/predict", json=IRIS_ROW).status_code == 200
    assert time.monotonic() - started < 5
    app.extensions["prediction_log"].flush()
    assert DROPPED.labels("database")._value.get() - before == 20
    health = client.get("/health").get_json()["prediction_log"]
    assert health["status"] == "degraded" and "prediction log" in health["reason"]
    assert client.get("/ready").status_code == 200
    app.extensions["model_store"].stop()


@pytest.mark.parametrize(("setting", "value"), [("PREDICTION_LOG_URL", "not a url"), ("PREDICTION_LOG_SAMPLE", "2")])
def test_a_bad_log_setting_stops_the_start_naming_it(setting, value):
    with pytest.raises(ConfigError, match=setting):
        create_app({setting: value, "START_MODEL_STORE": False, "API_TOKEN": TOKEN})


def test_a_sample_of_zero_records_nothing_and_says_so(app_config, store, tmp_path):
    store["registry"].set_active_model(store["default"])
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    app = create_app({**app_config, "PREDICTION_LOG_URL": url, "PREDICTION_LOG_SAMPLE": 0})
    answer = client_of(app).post("/predict", json=IRIS_ROW).get_json()
    assert answer["prediction_logged"] is False and len(answer["prediction_ids"]) == 1
    app.extensions["prediction_log"].flush()
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 0
    engine.dispose()
    app.extensions["model_store"].stop()


def test_inputs_are_stored_only_when_asked_and_a_report_from_them_equals_drift(app_config, store, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    from serving.drift_report import drift_from_log, main

    store["registry"].set_active_model(store["default"])
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    settings = {**app_config, "PREDICTION_LOG_URL": url, "PREDICTION_LOG_FLUSH_SECONDS": 0.1, "DRIFT_MIN_ROWS": 50,
                "PREDICTION_LOG_INPUTS": True, "PREDICTION_LOG_EXCLUDE": "sepal_width_cm"}  # fmt: skip
    app = create_app(settings)
    try:
        client = client_of(app)
        sent = {}
        for index in range(26):  # the last, of 250 rows, is written as columns (prediction_log.LARGE_ROWS)
            body = {"records": rows(250 if index == 25 else 1 + index % 40, 500 + index)}
            answer = client.post("/predict", json=body).get_json()
            sent.update(zip(answer["prediction_ids"], body["records"]))
        model = app.extensions["model_store"].get()
        app.extensions["prediction_log"].flush()
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            stored = {
                row.id: row for row in connection.execute(sa.text("SELECT id, inputs, out_of_range FROM predictions"))
            }
        assert set(stored) == set(sent)
        limits = {cells.name: (cells.low, cells.high) for cells in model.baseline.features}
        for prediction_id, row in sent.items():
            kept = {name: value for name, value in row.items() if name != "sepal_width_cm"}
            assert json.loads(stored[prediction_id].inputs) == kept
            outside = any(not limits[n][0] <= v <= limits[n][1] for n, v in row.items())
            assert bool(stored[prediction_id].out_of_range) is outside
        assert 0 < sum(bool(row.out_of_range) for row in stored.values()) < len(stored)
        live = client.get("/drift").get_json()["models"][0]
        name, version = model.ref.name, model.ref.version
        offline = drift_from_log(engine, model.baseline, name, version, min_rows=50)
        engine.dispose()
    finally:
        app.extensions["model_store"].stop()
    assert offline["rows"] == live["rows"] == len(sent) and offline["not_logged"] == ["sepal_width_cm"]
    levels = {f["level"] for f in offline["features"]} | {offline["prediction"]["level"]}  # the logged ones only
    assert offline["status"] == ("alert" if "alert" in levels else "warn" if "warn" in levels else "ok")
    features = {f["name"]: f for f in live["features"]}
    assert {f["name"] for f in offline["features"]} == set(features) - {"sepal_width_cm"}
    for feature in offline["features"]:
        for key in ("psi", "js", "noise"):
            assert abs(feature[key] - features[feature["name"]][key]) < 1e-9, (feature, key)
    for key in ("psi", "js"):
        assert abs(offline["prediction"][key] - live["prediction"][key]) < 1e-9
    # The command line: the baseline from the registry, the database and limits from the settings.
    for key, value in {**settings, "PREDICTION_LOG_INPUTS": "true"}.items():
        monkeypatch.setenv(key, str(value))
    assert main(["report", "--model", name, "--version", version]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["features"] == offline["features"] and printed["scope"] == "prediction_log"


def test_log_times_are_an_iso_time_or_a_span_back_from_now():
    from kernel.prediction_db import log_time

    now = datetime(2026, 12, 7, 12, 0)
    assert log_time("7d", now) == now - timedelta(days=7)
    assert log_time("12h", now) == now - timedelta(hours=12)
    assert log_time("90m", now) == now - timedelta(minutes=90)
    assert log_time("900s", now) == now - timedelta(seconds=900)
    assert log_time("2026-12-01T00:00:00+01:00") == datetime(2026, 11, 30, 23, 0)  # converted to UTC
    assert log_time("2026-12-01T00:00") == datetime(2026, 12, 1)  # no offset: UTC
    for bad in ("yesterday", "7 weeks", "-1d", ""):
        with pytest.raises(ValueError):
            log_time(bad)
