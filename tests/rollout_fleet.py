"""The fleet for tests/test_rollout_drill.py: an `mlflow server` that a test may kill and start again, three
versions of one model (the third raises on a category it never saw), two gunicorn instances of 2 workers each
reporting every second (the fixtures, in the test module), and the helpers that send keyed traffic until a
condition holds."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import requests

from tests.conftest import AUTH, stop
from tests.servers import Service, start_mlflow_server, worker_pids

NAME = "plans"  # 1: stable; 2: a good candidate; 3: a candidate that raises on the plan "gold"
FEATURES = ("usage", "tenure", "plan")
LEASE = 4.0
ENV = {"ACTIVE_POLL_SECONDS": "1", "ROLLOUT_REPORT_SECONDS": "1", "ROLLOUT_LEASE_SECONDS": str(LEASE),
       "BOOTSTRAP_DEFAULT_MODEL": "false", "PREDICTION_LOG": "off"}  # fmt: skip


def register(uri: str) -> None:
    """Three versions of NAME on the same features and classes; the third's encoder rejects unseen plans."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    generator = random.Random(7)
    frame = pd.DataFrame([row(generator, plans=("basic", "pro", "gold")) for _ in range(300)])
    labels = ["churn" if r.usage < 40 or r.plan == "basic" and r.tenure < 12 else "stay" for r in frame.itertuples()]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # (a job run in this test process may have pointed the registry elsewhere)
    mlflow.set_experiment("rollout-drill")
    for estimator, unknown, rows in ((LogisticRegression(max_iter=500), "ignore", frame),
                                     (GaussianNB(), "ignore", frame),
                                     (LogisticRegression(max_iter=500), "error", frame[frame.plan != "gold"])):  # fmt: skip
        encode = ColumnTransformer([("plan", OneHotEncoder(handle_unknown=unknown, sparse_output=False), ["plan"])],
                                   remainder="passthrough")  # fmt: skip
        pipeline = Pipeline([("encode", encode), ("model", estimator)])
        fitted = pipeline.fit(rows, [labels[i] for i in rows.index])
        with mlflow.start_run():
            mlflow.sklearn.log_model(fitted, name="model", registered_model_name=NAME, input_example=rows.head(3),
                                     signature=infer_signature(rows, fitted.predict(rows)))  # fmt: skip


def row(generator: random.Random, plans=("basic", "pro")) -> dict:
    return {"usage": round(generator.uniform(0, 100), 1), "tenure": float(generator.randint(1, 48)),
            "plan": generator.choice(plans)}  # fmt: skip


class Registry:
    """The `mlflow server` on a SQLite store, which a test may kill (the whole process tree) and start again."""

    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def __init__(self, folder):
        self.folder = folder
        self.process, self.uri, self.log = start_mlflow_server(*self._stores(), folder, env=self.env)
        self.port = int(self.uri.rsplit(":", 1)[1])

    def _stores(self):
        return f"sqlite:///{self.folder / 'mlflow.db'}", (self.folder / "artifacts").as_uri()

    def kill(self) -> None:
        tree, pending = set(), {self.process.pid}
        while pending:
            pid = pending.pop()
            tree.add(pid)
            pending |= worker_pids(pid) - tree
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def restart(self) -> None:
        self.process, _, self.log = start_mlflow_server(*self._stores(), self.folder, env=self.env, port=self.port)

    def stop(self) -> None:
        stop(self.process)
        self.log.close()


def predict(service: Service, key: str, body: dict) -> requests.Response:
    answer = requests.post(f"{service.url}/predict", json=body, headers={"X-User-Id": key}, timeout=30)
    assert answer.status_code == 200, (answer.status_code, answer.text, service.log_tail())
    return answer


def rollout(service: Service) -> dict:
    answer = requests.get(f"{service.url}/rollout", headers=AUTH, timeout=30)
    assert answer.status_code == 200, (answer.status_code, answer.text, service.log_tail())
    return answer.json()


def start_rollout(service: Service, body: dict) -> dict:
    """POST /rollout on `service`; the started rollout's state (201, or the test fails with the answer)."""
    answer = requests.post(f"{service.url}/rollout", json=body, headers=AUTH, timeout=30)
    assert answer.status_code == 201, answer.text
    return answer.json()


def traffic_until(services, condition, timeout: float, arms: dict, keys=200, gold=0.0, seed=0, rollout_id=None):
    """Send keyed requests round the services until `condition()` holds; records each key's latest route in `arms`.

    A key on the candidate never goes back to the stable version on the same instance. (Across instances it
    may for a moment: while a step moves, each instance follows the new percent within its poll.)"""
    generator, deadline, sent, seen = random.Random(seed), time.monotonic() + timeout, 0, {}
    while True:
        state = condition()
        if state:
            return state
        assert time.monotonic() < deadline, (f"not reached in {timeout:.0f} s after {sent} requests",
                                             rollout(services[0]), [s.log_tail(20) for s in services])  # fmt: skip
        for _ in range(20):
            key = f"user-{generator.randrange(keys)}"
            body = row(generator, ("basic", "pro", "gold") if generator.random() < gold * 3 else ("basic", "pro"))
            service = services[sent % len(services)]
            answer = predict(service, key, body)
            route = answer.headers["X-Model-Route"]
            # (`active`: an instance that has not read the rollout yet; another id: one that has not read its end)
            if route in ("stable", "candidate") and rollout_id in (None, answer.headers.get("X-Rollout-Id")):
                previous = seen.get((service.url, key), arms.get(key) if len(services) == 1 else None)
                assert (previous, route) != ("candidate", "stable"), f"{key} left the candidate on {service.url}"
                seen[(service.url, key)] = arms[key] = route
            sent += 1


def version_tags(client, version: str) -> dict:
    return client.get_model_version(NAME, version).tags
