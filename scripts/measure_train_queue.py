"""Training throughput on Celery workers: jobs per minute for a burst of small jobs, with 1 and with 2 workers.

Run: .venv/bin/python scripts/measure_train_queue.py [--jobs 12] [--workers 1 2]
For each worker count it starts, on loopback: a fresh PostgreSQL database and an `mlflow server` on it,
its own `redis-server`, the API under gunicorn (2 workers, TRAIN_EXECUTOR=celery) and that many
`make worker` processes (concurrency 1). It sends --jobs small jobs at once (LogisticRegression and
DecisionTree on iris, not activated), waits for all, and prints jobs per minute (from the first job's
creation to the last one's end), the longest time a job waited in the queue, the mean run time, and the mean
time a worker stood idle between the end of one job and the start of its next (the pool replacing its process). Before the
burst, POST→succeeded of one LogisticRegression on iris (three, after one that opens the store), and during it
the workers' parents' RSS and the largest RSS of a job's process.
Needs PostgreSQL on 127.0.0.1:5432 and redis-server, as the tests do.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.celery_helpers import RedisServer, Worker  # noqa: E402
from tests.conftest import stop  # noqa: E402
from tests.servers import Service, create_database, drop_database, start_mlflow_server  # noqa: E402
from tests.test_celery import AUTH, celery_env  # noqa: E402


def post_to_succeeded(url: str) -> float:
    """One LogisticRegression on iris, from POST /train to `succeeded`, polled every 20 ms."""
    started = time.perf_counter()
    body = {"estimator": "LogisticRegression", "dataset": "iris", "model_name": "single", "activate": False}
    location = requests.post(f"{url}/train", json=body, headers=AUTH, timeout=60).json()["location"]
    while requests.get(f"{url}{location}", headers=AUTH, timeout=30).json()["status"] not in ("succeeded", "failed"):
        time.sleep(0.02)
    return time.perf_counter() - started


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


class RssSampler:
    """The workers' parents' RSS, and the largest RSS any of their children (the job processes) reached."""

    def __init__(self, parents: list[int]):
        self.parents, self.parent_mib, self.child_mib, self._stop = parents, 0.0, 0.0, threading.Event()

    def start(self) -> RssSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for parent in self.parents:
                self.parent_mib = max(self.parent_mib, rss_mib(parent))
                children = Path(f"/proc/{parent}/task/{parent}/children")
                for child in children.read_text().split() if children.exists() else []:
                    self.child_mib = max(self.child_mib, rss_mib(int(child)))

    def stop(self) -> None:
        self._stop.set()


def idle_between_jobs(jobs: list[dict]) -> list[float]:
    """Each worker's idle time between one job's end and its next job's start (its process replaced meanwhile)."""
    gaps, by_worker = [], {}
    for job in jobs:
        by_worker.setdefault(job["worker"].split(":")[0], []).append(job)
    for runs in by_worker.values():
        runs.sort(key=lambda job: job["started_at"])
        gaps += [(datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["finished_at"])).total_seconds()
                 for a, b in zip(runs, runs[1:])]  # fmt: skip
    return gaps


def measure(jobs: int, workers: int, folder: Path) -> dict:
    database = create_database()
    redis = RedisServer(shutil.which("redis-server"), folder).start()
    process, uri, log = start_mlflow_server(
        f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}", (folder / "artifacts").as_uri(), folder
    )
    env = celery_env({"uri": uri}, redis.url)
    api, started = None, []
    try:
        api = Service({**env, "STATE_DIR": str(folder / "api")}, folder, workers=2).start(timeout=300)
        started = [Worker(f"w{i}", env, folder).start() for i in range(workers)]
        single = [post_to_succeeded(api.url) for _ in range(4)][1:]  # the first one opens the store's client
        sampler = RssSampler([worker.process.pid for worker in started]).start()
        bodies = [{"estimator": ["LogisticRegression", "DecisionTreeClassifier"][i % 2], "dataset": "iris",
                   "model_name": f"queue-{i}", "activate": False} for i in range(jobs)]  # fmt: skip
        ids = [None] * jobs

        def send(index: int) -> None:
            answer = requests.post(f"{api.url}/train", json=bodies[index], headers=AUTH, timeout=60)
            assert answer.status_code == 202, answer.text
            ids[index] = answer.json()["job_id"]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(jobs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = []
        for job_id in ids:
            while (job := requests.get(f"{api.url}/train/jobs/{job_id}", headers=AUTH, timeout=30).json())[
                "status"
            ] not in ("succeeded", "failed"):
                time.sleep(0.5)
            assert job["status"] == "succeeded", job
            results.append(job)
        wall = (max(datetime.fromisoformat(job["finished_at"]) for job in results)
                - min(datetime.fromisoformat(job["created_at"]) for job in results)).total_seconds()  # fmt: skip
        gaps = idle_between_jobs(results)
        sampler.stop()
        return {
            "workers": workers,
            "post_to_succeeded_seconds": [round(t, 2) for t in single],
            "worker_parent_rss_mib": sampler.parent_mib,
            "largest_child_rss_mib": sampler.child_mib,
            "jobs": jobs,
            "seconds": round(wall, 1),
            "jobs_per_minute": round(jobs / wall * 60, 1),
            "longest_wait_seconds": round(max(job["waited_seconds"] for job in results), 1),
            "mean_run_seconds": round(statistics.mean(job["elapsed_seconds"] for job in results), 2),
            "mean_gap_between_jobs_seconds": round(statistics.mean(gaps), 2) if gaps else None,
        }
    finally:
        for worker in started:
            worker.stop()
        if api is not None:
            api.stop()
        stop(process)
        log.close()
        redis.stop()
        drop_database(database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    for count in args.workers:
        with tempfile.TemporaryDirectory(prefix="train-queue-") as folder:
            print(measure(args.jobs, count, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
