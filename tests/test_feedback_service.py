"""The prediction log under gunicorn (2 workers, as `make serve`), on the SQLite default and on PostgreSQL:
every answered row of a graceful stop is in the table, and a SIGKILLed worker loses at most one flush."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import AUTH, IRIS_ROW
from tests.servers import Service, create_database, drop_database, require_postgres

pytestmark = pytest.mark.drill

FLUSH_SECONDS = 0.5


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'predictions.db'}"
        return
    require_postgres()
    name = create_database()
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    drop_database(name)


def count(url: str, where: str = "1=1") -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(f"SELECT count(*) FROM predictions WHERE {where}")).scalar_one()
    finally:
        engine.dispose()


def test_a_graceful_stop_loses_no_row_and_a_killed_worker_at_most_one_flush(tmp_path, database):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREDICTION_LOG_URL": database,
           "PREDICTION_LOG_FLUSH_SECONDS": str(FLUSH_SECONDS)}  # fmt: skip
    service = Service(env, tmp_path, workers=2).start()
    sessions = [requests.Session() for _ in range(4)]
    try:
        ids, pids = [], set()
        for index in range(400):
            answer = sessions[index % 4].post(f"{service.url}/predict", json={"records": [IRIS_ROW] * 2}, timeout=30)
            assert answer.status_code == 200
            ids += answer.json()["prediction_ids"]
            pids.add(answer.headers["X-Worker-Pid"])
        assert len(pids) == 2, "one worker answered everything"
        # Labels for some of them, through the service: they are applied once the rows are written.
        deadline = time.monotonic() + 30
        while count(database) < 800:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        applied = requests.post(f"{service.url}/feedback", headers=AUTH, timeout=30,
                                json={"feedback": [{"prediction_id": i, "label": "setosa"} for i in ids[:100]]})  # fmt: skip
        assert applied.json()["accepted"] == 100, applied.text
        assert requests.get(f"{service.url}/health", timeout=10).json()["prediction_log"] == {"status": "ok"}

        # SIGKILL one worker right after a burst it answered: what it loses is at most what it answered within
        # one flush interval (plus the time a write takes) before the kill.
        victim = sorted(pids)[0]
        before = count(database)
        answered = []
        for index in range(300):
            answer = sessions[index % 4].post(f"{service.url}/predict", json=IRIS_ROW, timeout=30)
            assert answer.status_code == 200
            answered.append((answer.headers["X-Worker-Pid"], time.monotonic()))
            time.sleep(0.01)  # spread over seconds: most rows are older than one flush interval
        killed_at = time.monotonic()
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 30  # the survivor's writer flushes all of its rows
        survivor_rows = sum(pid != victim for pid, _ in answered)
        while count(database) < before + survivor_rows:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        time.sleep(FLUSH_SECONDS)
        lost = before + len(answered) - count(database)
        recent = sum(pid == victim and at >= killed_at - FLUSH_SECONDS - 0.5 for pid, at in answered)
        print(f"\nSIGKILL of a worker: {lost} of its {len(answered) - survivor_rows} rows lost; it answered "
              f"{recent} in the last flush interval ({FLUSH_SECONDS} s) and 0.5 s")  # fmt: skip
        assert 0 <= lost <= recent, (lost, recent)

        # A graceful stop: every row answered since is in the table.
        for session in sessions:
            session.close()
        service.wait_for_workers(60)
        before = count(database)
        for _ in range(300):
            assert requests.post(f"{service.url}/predict", json=IRIS_ROW, timeout=30).status_code == 200
        service.stop()
        assert count(database) == before + 300
        assert count(database, "label IS NOT NULL") == 100
    finally:
        service.stop()


def metric_value(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = next((line for line in text.splitlines() if line.startswith(f"{name}{{{wanted}}}")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_postgresql_stopped_mid_load_fails_no_prediction_and_logging_resumes_without_a_restart(tmp_path):
    from tests.tcp_proxy import TcpProxy

    require_postgres()
    name = create_database()
    proxy = TcpProxy(5432)  # the service reaches PostgreSQL only through it: cutting it stops the database for them
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/{name}"
    direct = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREDICTION_LOG_URL": url,
           "PREDICTION_LOG_FLUSH_SECONDS": str(FLUSH_SECONDS)}  # fmt: skip
    service = Service(env, tmp_path, workers=2).start()

    def load(seconds: float) -> int:
        """Predictions on fresh connections (both workers answer, both queue rows), every one a 200."""
        sent, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            answer = requests.post(f"{service.url}/predict", json=IRIS_ROW, timeout=30, headers={"Connection": "close"})
            assert answer.status_code == 200, (answer.status_code, answer.text, service.log_tail())
            sent += 1
        return sent

    try:
        load(1.0)
        deadline = time.monotonic() + 30
        while count(direct) == 0:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        proxy.cut()
        load(3 * FLUSH_SECONDS + 1.0)  # every prediction answered while the database is away
        deadline = time.monotonic() + 30
        while (health := requests.get(f"{service.url}/health", timeout=10).json())["prediction_log"]["status"] == "ok":
            assert time.monotonic() < deadline, service.log_tail()
            load(FLUSH_SECONDS)
        assert (
            health["prediction_log"]["status"] == "degraded" and "prediction log" in health["prediction_log"]["reason"]
        )
        assert requests.get(f"{service.url}/ready", timeout=10).status_code == 200
        metrics = requests.get(f"{service.url}/metrics", timeout=10).text
        assert metric_value(metrics, "prediction_log_dropped_total", reason="database") > 0, service.log_tail()
        # The database is back: logging resumes in the same processes (no restart), and /health says ok again.
        proxy.restore()
        written = count(direct)
        deadline = time.monotonic() + 60
        while count(direct) == written or (
            requests.get(f"{service.url}/health", timeout=10).json()["prediction_log"]["status"] != "ok"
        ):
            assert time.monotonic() < deadline, service.log_tail()
            load(FLUSH_SECONDS)
        assert service.process.poll() is None
    finally:
        service.stop()
        proxy.close()
        drop_database(name)


def predict_on_both_workers(service: Service, sessions: list, generator: random.Random) -> tuple[list, list]:
    """1,000 random rows, 4 to a request over the sessions, answered by both workers: their labels and their ids."""
    names = list(IRIS_ROW)
    predicted, ids, pids = [], [], set()
    for index in range(250):
        records = [{n: round(generator.uniform(0.1, 7.5), 1) for n in names} for _ in range(4)]
        answer = sessions[index % 4].post(f"{service.url}/predict", json={"records": records}, timeout=30)
        assert answer.status_code == 200, answer.text
        predicted += answer.json()["predictions"]
        ids += answer.json()["prediction_ids"]
        pids.add(answer.headers["X-Worker-Pid"])
    assert len(pids) == 2 and len(ids) == len(set(ids)) == 1000
    return predicted, ids


def assert_figures_are_sklearns(figures: dict, truth: list, guessed: list, classes: list) -> None:
    """/performance's figures equal scikit-learn's on the same pairs."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    assert figures["accuracy"] == pytest.approx(accuracy_score(truth, guessed), abs=1e-12)
    assert figures["f1_macro"] == pytest.approx(f1_score(truth, guessed, average="macro"), abs=1e-12)
    precision = precision_score(truth, guessed, labels=classes, average=None, zero_division=0)
    recall = recall_score(truth, guessed, labels=classes, average=None, zero_division=0)
    for index, label in enumerate(classes):
        assert figures["per_class"][label]["precision"] == pytest.approx(precision[index], abs=1e-12)
        assert figures["per_class"][label]["recall"] == pytest.approx(recall[index], abs=1e-12)
    assert figures["confusion_matrix"] == {
        "labels": classes, "matrix": confusion_matrix(truth, guessed, labels=classes).tolist()
    }  # fmt: skip


def model_samples_once_refreshed(service: Service) -> dict:
    """The default model's model_* samples in /metrics, once they count the 600 labelled rows."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import DEFAULT_NAME

    deadline = time.monotonic() + 60
    while True:
        text = requests.get(f"{service.url}/metrics", timeout=10).text
        ours = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name.startswith("model_") and s.labels.get("model") == DEFAULT_NAME}  # fmt: skip
        if ours.get("model_labelled_rows") == 600:
            return ours
        assert time.monotonic() < deadline, (ours, service.log_tail())
        time.sleep(0.2)


def test_live_figures_over_both_workers_equal_our_own_and_reach_metrics_and_mlflow(tmp_path, database):
    """1,000 rows answered by both workers, 600 of them labelled: /performance equals scikit-learn's figures on the
    same pairs, and after a refresh /metrics and the version's MLflow run say the same."""
    from tests.conftest import DEFAULT_NAME, mlflow_client

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "PREDICTION_LOG_URL": database,
           "PREDICTION_LOG_FLUSH_SECONDS": str(FLUSH_SECONDS), "PERFORMANCE_REFRESH_SECONDS": "1",
           "PERFORMANCE_LOG_SECONDS": "1"}  # fmt: skip
    service = Service(env, tmp_path, workers=2).start()
    sessions = [requests.Session() for _ in range(4)]
    generator = random.Random(11)
    try:
        predicted, ids = predict_on_both_workers(service, sessions, generator)
        classes = sorted(set(predicted) | {"setosa", "versicolor", "virginica"})
        deadline = time.monotonic() + 30
        while count(database) < 1000:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        truth = [label if generator.random() < 0.7 else generator.choice(classes) for label in predicted[:600]]
        items = [{"prediction_id": i, "label": t} for i, t in zip(ids[:600], truth, strict=True)]
        applied = requests.post(f"{service.url}/feedback", headers=AUTH, json={"feedback": items}, timeout=60)
        assert applied.json() == {"accepted": 600, "updated": 0, "unknown_ids": [], "invalid": []}, applied.text

        guessed = predicted[:600]
        figures = requests.get(f"{service.url}/models/{DEFAULT_NAME}/versions/1/performance?window=1d", timeout=30)
        figures = figures.json()
        assert figures["labelled_rows"] == 600 and figures["predicted_rows"] == 1000, figures
        assert_figures_are_sklearns(figures, truth, guessed, classes)

        # After a refresh (every second here), /metrics says the same, and so does the version's MLflow run.
        ours = model_samples_once_refreshed(service)
        assert ours["model_live_accuracy"] == pytest.approx(figures["accuracy"], abs=1e-12)
        assert ours["model_live_f1_macro"] == pytest.approx(figures["f1_macro"], abs=1e-12)
        client = mlflow_client(tracking_uri)  # not MlflowClient(uri): an earlier test's registry URI is process-wide
        run_id = client.get_model_version(DEFAULT_NAME, "1").run_id

        def newest(key: str):  # the history's order is the store's: the newest is the largest step (the time)
            history = client.get_metric_history(run_id, key)
            return max(history, key=lambda m: (m.step, m.timestamp)) if history else None

        deadline = time.monotonic() + 60
        while (labelled := newest("labelled_rows")) is None or labelled.value != 600:
            assert time.monotonic() < deadline, (client.get_metric_history(run_id, "labelled_rows"), service.log_tail())
            time.sleep(0.2)
        assert newest("live_accuracy").value == pytest.approx(figures["accuracy"])
        assert newest("live_f1_macro").value == pytest.approx(figures["f1_macro"])
    finally:
        for session in sessions:
            session.close()
        service.stop()
