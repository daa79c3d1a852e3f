"""Drift on gunicorn with 2 workers: a model trained through /train on a generated CSV, counted across workers."""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
import requests

from kernel.drift_format import BASELINE_TAG
from tests.conftest import AUTH, TOKEN, mlflow_client
from tests.servers import Service
from tests.test_drift import generate

pytestmark = pytest.mark.drill


def labelled(rows: int, seed: int):
    frame = generate(rows, seed)
    frame["label"] = np.where(frame["age"] + 10 * frame["score"] > 45, "yes", "no")
    return frame


def json_rows(frame) -> list[dict]:
    """Rows as a client sends them to this model: a CSV's True/False column was trained as text."""
    return [{k: (None if isinstance(v, float) and v != v else str(v) if isinstance(v, bool) else v)
             for k, v in row.items()} for row in frame.drop(columns="label").to_dict("records")]  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drift")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "API_TOKEN": TOKEN, "LOG_FORMAT": "json"}
    service = Service(env, folder, workers=2).start()
    csv = io.StringIO()
    labelled(20_000, seed=1).to_csv(csv, index=False)
    answer = requests.post(f"{service.url}/train", headers=AUTH, timeout=600,
                           data={"estimator": "LogisticRegression", "target": "label", "model_name": "drift-lr",
                                 "wait": "true"},
                           files={"file": ("customers.csv", csv.getvalue().encode(), "text/csv")})  # fmt: skip
    assert answer.status_code == 201, answer.text
    yield service
    service.stop()


def send(service, rows: list[dict], seed: int) -> tuple[int, set[str]]:
    """Send the rows in batches of 1 to 100, alternately on two keep-alive connections held by the two workers (on
    fresh connections one after another, the kernel may hand every one to the same worker); rows answered, pids."""
    rng = np.random.default_rng(seed)
    sessions = two_workers(service)
    sent, pids, start = 0, set(), 0
    while start < len(rows):
        size = int(rng.integers(1, 101))
        batch = rows[start : start + size]
        session = sessions[min(len(pids), 1) if len(pids) < 2 else start % 2]  # each worker first, then either
        answer = session.post(f"{service.url}/predict", json={"records": batch}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["name"] == "drift-lr"
        sent += len(batch)
        pids.add(answer.headers["X-Worker-Pid"])
        start += size
    for session in sessions:
        session.close()
    return sent, pids


def two_workers(service, attempts: int = 50) -> list[requests.Session]:
    """Two keep-alive connections, each held by another of the two workers."""
    first = requests.Session()
    held = first.get(f"{service.url}/health", timeout=30).headers["X-Worker-Pid"]
    for _ in range(attempts):
        second = requests.Session()
        if second.get(f"{service.url}/health", timeout=30).headers["X-Worker-Pid"] != held:
            return [first, second]
        second.close()
        time.sleep(0.05)
    raise AssertionError(f"every connection went to worker {held}: {service.log_tail()}")


def drift_of(service, rows: int | None = None) -> dict:
    """The served version's /drift entry; with `rows`, once that many are counted (each worker counts its small
    requests every DRIFT flush, 0.2 s)."""
    deadline = time.monotonic() + 15
    while True:
        [entry] = requests.get(f"{service.url}/drift", timeout=30).json()["models"]
        if rows is None or entry["rows"] >= rows:
            return entry
        assert time.monotonic() < deadline, (entry["rows"], rows, service.log_tail())
        time.sleep(0.1)


def metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = next(line for line in text.splitlines() if line.startswith(f"{name}{{{wanted}}}"))
    return float(line.rsplit(" ", 1)[1])


def test_no_drift_counted_exactly_across_both_workers(service):
    sent, pids = send(service, json_rows(labelled(2_000, seed=50)), seed=1)
    assert len(pids) == 2, f"one worker answered every batch: {pids}"
    entry = drift_of(service, rows=sent)
    assert entry["rows"] == sent == 2_000 and entry["status"] == "ok", entry
    # The local job registered the baseline the instance counts against (`/train`'s path).
    tags = mlflow_client(service.env["MLFLOW_TRACKING_URI"]).get_model_version("drift-lr", entry["version"]).tags
    assert entry["baseline"]["sha256"] == tags[BASELINE_TAG]
    assert all(f["psi"] < 0.1 for f in entry["features"]) and entry["prediction"]["psi"] < 0.1
    text = requests.get(f"{service.url}/metrics", timeout=30).text
    version = entry["version"]
    assert metric(text, "model_drift_rows", model="drift-lr", version=version) == 2_000
    for feature in entry["features"]:
        assert metric(text, "model_feature_psi", feature=feature["name"], model="drift-lr", version=version) == \
            pytest.approx(feature["psi"])  # fmt: skip


def test_a_shift_alerts_after_a_restart_and_a_killed_worker_keeps_its_counts(service):
    service.stop()
    service.start()  # gunicorn's on_starting clears the counts: the window starts empty
    assert drift_of(service)["rows"] == 0
    shifted = labelled(1_000, seed=60)
    shifted["age"] += 3 * 12  # 3 sigma
    sent, pids = send(service, json_rows(shifted), seed=2)
    assert len(pids) == 2
    before = drift_of(service, rows=sent)
    os.kill(int(min(pids)), signal.SIGKILL)  # its file stays: its counts were real
    service.wait_for_workers()
    entry = drift_of(service)
    assert entry["rows"] == before["rows"] == sent == 1_000
    by_name = {f["name"]: f for f in entry["features"]}
    assert by_name["age"]["level"] == "alert" and by_name["age"]["out_of_range"] > 0
    assert all(f["psi"] < 0.1 for name, f in by_name.items() if name != "age"), by_name
    # Rows from one class's region only: the predicted classes move.
    service.stop()
    service.start()
    frame = labelled(4_000, seed=70)
    sent, _ = send(service, json_rows(frame[frame["label"] == "yes"].head(1_000)), seed=4)
    assert drift_of(service, rows=sent)["prediction"]["level"] == "alert"
