"""Memory of gunicorn workers with the model loaded, with preload_app off (our choice) and on.

Run: .venv/bin/python scripts/measure_workers.py [--workers 4]
For each setting it starts gunicorn on a free loopback port and a temporary MLflow store (bootstrapped
once, before the measurement), sends 200 predictions, then reads each worker's RSS and PSS (PSS
splits shared pages between the processes that share them, so the PSS sum is the real total).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.bench_train_load import ROW, free_port, wait_ready  # noqa: E402


def memory(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process in MiB."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:"):
                values[parts[0]] = int(parts[1]) // 1024
    return values["Rss:"], values["Pss:"]


def run(store: str, workers: int, preload: bool) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PORT": str(port), "WEB_CONCURRENCY": str(workers),
           "STATE_DIR": tempfile.mkdtemp(prefix="state-"), "GUNICORN_PRELOAD": str(preload).lower()}  # fmt: skip
    command = [str(Path(sys.executable).parent / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"]
    started = time.monotonic()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url)
        ready = time.monotonic() - started
        for _ in range(200):
            requests.post(f"{url}/predict", json=ROW, headers={"Connection": "close"}, timeout=30).raise_for_status()
        children = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        per_worker = [memory(pid) for pid in children]
        master = memory(server.pid)
        return {"ready": ready, "workers": per_worker, "master": master}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="measure-")
    store = f"sqlite:///{folder}/mlflow.db"
    run(store, 1, False)  # bootstrap the default model once, outside the measurement
    for preload in (False, True):
        result = run(store, args.workers, preload)
        rss = [r for r, _ in result["workers"]]
        pss = [p for _, p in result["workers"]]
        print(f"preload_app={preload!s:5}: ready in {result['ready']:.1f} s; per worker RSS {min(rss)}-{max(rss)} MiB, "
              f"PSS {min(pss)}-{max(pss)} MiB; master RSS {result['master'][0]} MiB; "
              f"total PSS {sum(pss) + result['master'][1]} MiB for {args.workers} workers")  # fmt: skip


if __name__ == "__main__":
    main()
