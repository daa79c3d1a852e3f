"""/predict latency (p50, p99) while idle and while a training job runs, under gunicorn as `make run` starts it.

Run: .venv/bin/python scripts/bench_train_load.py [--requests 2000] [--clients 4]
It starts gunicorn (gunicorn.conf.py, WEB_CONCURRENCY workers, default 2) on a free loopback port and a
temporary MLflow store, sends one-row predictions from --clients threads (a bounded number of requests,
and at most 120 s per phase), first idle, then while a GradientBoosting model (150 rounds, 10 classes) trains on the digits
data through POST /train, and prints the percentiles of both phases.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 180) -> None:
    """Wait until the service answers /ready with 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.2)


def load(url: str, total: int, clients: int, keep_going=lambda: True, max_seconds: float = 120) -> list[float]:
    """Send `total` one-row predictions from `clients` threads; returns latencies in ms (failures raise)."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    remaining = [total]

    def client():
        session = requests.Session()
        while time.monotonic() < deadline and keep_going():
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            started = time.perf_counter()
            answer = session.post(f"{url}/predict", json=ROW, timeout=30)
            elapsed = (time.perf_counter() - started) * 1000
            answer.raise_for_status()
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def percentiles(latencies: list[float]) -> str:
    cuts = statistics.quantiles(latencies, n=100)
    return f"n={len(latencies):5d}  p50 {cuts[49]:6.1f} ms  p99 {cuts[98]:6.1f} ms  max {max(latencies):6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-train-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "PORT": str(port), "HOST": "127.0.0.1",
           "API_TOKEN": "bench-token"}  # fmt: skip
    auth = {"Authorization": "Bearer bench-token"}
    with open(Path(folder) / "gunicorn.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_ready(url)
            load(url, 200, args.clients)  # warm-up
            idle = load(url, args.requests, args.clients)

            job = requests.post(f"{url}/train", json={"estimator": "GradientBoostingClassifier", "dataset": "digits",
                                                      "params": {"n_estimators": 150}, "activate": False}, timeout=30, headers=auth).json()  # fmt: skip
            started = time.monotonic()
            state = {"status": "queued"}

            def poll():
                while state["status"] not in ("succeeded", "failed") and time.monotonic() - started < 300:
                    state["status"] = requests.get(f"{url}{job['location']}", timeout=30, headers=auth).json()["status"]
                    time.sleep(0.5)

            poller = threading.Thread(target=poll)
            poller.start()
            while state["status"] == "queued":
                time.sleep(0.1)
            busy = load(url, args.requests, args.clients, keep_going=lambda: state["status"] == "running")
            poller.join()
            print(f"gunicorn: {env.get('WEB_CONCURRENCY', '2')} workers x 4 threads; {args.clients} clients; "
                  f"{os.cpu_count()} CPUs; one-row /predict on the default RandomForest")  # fmt: skip
            print(f"idle:                 {percentiles(idle)}")
            print(f"during training job:  {percentiles(busy)}   (job: {state['status']}, "
                  f"{time.monotonic() - started:.0f} s)")  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
