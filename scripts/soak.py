"""Soak: N minutes of mixed load against gunicorn (2 workers) with swaps and training jobs; prints the figures.

    make soak                      # 10 minutes
    SOAK_MINUTES=2 make soak       # shorter

The script starts the service itself on a free loopback port with its own temporary MLflow store and
stops it at the end. Load: SOAK_CLIENTS threads (default 4) sending one-row and 100-row predictions,
GET /models and GET /metrics; a /use-model swap every minute between two iris versions; a training job
(activate: false) every two minutes. Workers are not recycled (GUNICORN_MAX_REQUESTS=0), so their
memory can be compared from the end of the warm-up to the end.

An answer is wrong-version if its `model` was not active at any moment while the request was in flight,
and mixed if its probabilities are not those its `model` gives for the row (or a batch's rows differ).
Exit status 1 when a request failed, an answer was wrong or mixed, or a worker grew by 5 % or more.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
ROW = {"sepal_length_cm": 5.9, "sepal_width_cm": 3.0, "petal_length_cm": 4.2, "petal_width_cm": 1.5}
BATCH = {"records": [ROW] * 100}
SWAP_SECONDS = 60
TRAIN_SECONDS = 120
GROWTH_TARGET = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def worker_pids(master: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    children.append(int(entry))
            except (OSError, IndexError):
                pass
    return sorted(children)


def percentiles(latencies: list[float]) -> str:
    """p50, p99 and their ratio of sorted latencies in seconds, as printed in the report."""
    if not latencies:
        return "no requests"
    p50, p99 = statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99)] * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({p99 / p50:.1f}x p50), {len(latencies)} requests"


class Soak:
    def __init__(self, minutes: float, clients: int, folder: Path):
        self.duration = minutes * 60
        self.warmup = min(120.0, self.duration / 5)
        self.clients = clients
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(16)
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.lock = threading.Lock()
        self.results: list[tuple] = []  # (kind, status, latency, ok, wrong, mixed)
        self.swaps: list[tuple[float, float, tuple, tuple]] = []  # (start, end, from, to)
        self.jobs: list[str] = []
        self.errors: list[str] = []
        self.expected: dict[tuple, dict] = {}
        self.stop = threading.Event()
        self.metrics_size: list[int] = []

    # ---- the service ---------------------------------------------------------------------------
    def start_service(self) -> None:
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "2",
               "MLFLOW_TRACKING_URI": f"sqlite:///{self.folder / 'mlflow.db'}", "STATE_DIR": str(self.folder / "state"),
               "API_TOKEN": self.token, "GUNICORN_MAX_REQUESTS": "0", "TRAIN_MAX_CONCURRENT_JOBS": "1",
               "TRAIN_TIME_LIMIT_SECONDS": "120", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
        self.log = open(self.folder / "gunicorn.log", "w")  # noqa: SIM115 - closed in stop_service()
        self.process = subprocess.Popen(
            # No control socket: every gunicorn of this user would share $HOME/.gunicorn/gunicorn.ctl.
            [str(Path(sys.executable).parent / "gunicorn"), "--config", "gunicorn.conf.py", "--no-control-socket",
             "wsgi:app"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.process.returncode}; see {self.folder / 'gunicorn.log'}"
                )
            try:
                if requests.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service was not ready within 5 minutes")
            time.sleep(0.5)

    def stop_service(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    # ---- set-up: two iris versions and what each answers -----------------------------------------
    def prepare(self) -> list[dict]:
        ready = requests.get(f"{self.url}/ready", timeout=10).json()["model"]
        first = {"name": ready["name"], "version": ready["version"]}  # /ready also says the runtime
        trained = requests.post(f"{self.url}/train", headers=self.auth, timeout=300, json={
            "estimator": "LogisticRegression", "dataset": "iris", "activate": False, "wait": True}).json()  # fmt: skip
        versions = [first, {"name": trained["model"]["name"], "version": trained["model"]["version"]}]
        for version in versions[::-1]:  # ends on the first one, which the service started with
            self.use_model(version, record=False)
            answer = requests.post(f"{self.url}/predict", json=ROW, timeout=10).json()
            self.expected[(version["name"], version["version"])] = answer["probabilities"][0]
        assert (
            self.expected[(versions[0]["name"], versions[0]["version"])]
            != self.expected[(versions[1]["name"], versions[1]["version"])]
        )
        return versions

    def use_model(self, version: dict, record: bool = True) -> None:
        """Swap, recorded from before it is sent: the service may serve the new version as soon as it has
        written it, before the 200 reaches us, so an answer finished meanwhile is judged with the swap
        in flight (its end is infinity until the answer comes)."""
        before = self.active_at(time.time()) if record else None
        target = (version["name"], version["version"])
        started = time.time()
        if record:
            with self.lock:
                self.swaps.append((started, math.inf, before, target))
        answer = requests.post(f"{self.url}/use-model", json=version, headers=self.auth, timeout=120)
        if answer.status_code != 200:
            raise RuntimeError(f"/use-model answered {answer.status_code}: {answer.text}")
        if record:
            with self.lock:
                self.swaps[self.swaps.index((started, math.inf, before, target))] = (
                    started,
                    time.time(),
                    before,
                    target,
                )

    def active_at(self, moment: float) -> tuple:
        active = self.initial
        for _, end, _, target in self.swaps:
            if end <= moment:
                active = target
        return active

    def allowed(self, started: float, ended: float) -> set:
        """Every version active at some moment while a request was in flight."""
        with self.lock:
            allowed = {self.active_at(started)}
            allowed |= {target for start, end, _, target in self.swaps if start <= ended and end >= started}
        return allowed

    def metrics_series(self) -> int:
        """How many series /metrics exposes: per-request growth there would show as a rising count."""
        text = requests.get(f"{self.url}/metrics", timeout=30).text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    # ---- the load -----------------------------------------------------------------------------
    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while not self.stop.is_set():
            draw = rng.random()
            kind = "predict" if draw < 0.7 else "batch" if draw < 0.85 else "models" if draw < 0.95 else "metrics"
            started = time.time()
            wrong = mixed = False
            try:
                if kind == "predict":
                    answer = session.post(f"{self.url}/predict", json=ROW, timeout=30)
                elif kind == "batch":
                    answer = session.post(f"{self.url}/predict", json=BATCH, timeout=30)
                else:
                    answer = session.get(f"{self.url}/{kind}", timeout=30)
                ended = time.time()
                ok = answer.status_code == 200
                if ok and kind in ("predict", "batch"):
                    body = answer.json()
                    model = (body["model"]["name"], body["model"]["version"])
                    allowed = self.allowed(started, ended)
                    wrong = model not in allowed
                    if wrong:  # what a diagnosis needs: which worker, when, and the swaps around it
                        with self.lock:
                            near = [(round(a - started, 3), round(b - started, 3), t) for a, b, _, t in self.swaps
                                    if abs(b - started) < 5 or abs(a - started) < 5]  # fmt: skip
                        self.note(f"wrong version: {kind} by worker {answer.headers.get('X-Worker-Pid')} answered "
                                  f"{model}, in flight {ended - started:.3f} s; allowed {sorted(allowed)}; swaps "
                                  f"(start, end relative to the request's start, target): {near}")  # fmt: skip
                    mixed = any(row != self.expected.get(model) for row in body["probabilities"])
                if not ok:
                    self.note(f"{kind}: {answer.status_code} {answer.text[:200]}")
            except (requests.RequestException, ValueError, KeyError) as exc:
                ended, ok = time.time(), False
                self.note(f"{kind}: {type(exc).__name__}: {exc}")
            with self.lock:
                self.results.append((kind, ended, ended - started, ok, wrong, mixed))

    def note(self, error: str) -> None:
        with self.lock:
            if len(self.errors) < 20:
                self.errors.append(error)

    def run(self) -> int:
        print(f"soak: starting gunicorn (2 workers) on {self.url}, store in {self.folder}", flush=True)
        self.start_service()
        versions = self.prepare()
        self.initial = (versions[0]["name"], versions[0]["version"])
        workers = worker_pids(self.process.pid)
        print(f"soak: {self.duration / 60:g} min, {self.clients} clients, workers {workers}; swapping between "
              f"{[(v['name'], v['version']) for v in versions]}", flush=True)  # fmt: skip
        threads = [threading.Thread(target=self.client, args=(seed,), daemon=True) for seed in range(self.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        warm, samples = None, []
        next_swap, next_train, next_sample, swap_index = SWAP_SECONDS, 0.0, 0.0, 1
        try:
            while (elapsed := time.monotonic() - started) < self.duration:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gunicorn's master exited with {self.process.returncode} during the soak")
                if elapsed >= next_sample:
                    samples.append({pid: rss_mib(pid) for pid in worker_pids(self.process.pid)})
                    if warm is None and elapsed >= self.warmup:
                        warm = samples[-1]
                        self.metrics_size = [self.metrics_series()]
                    next_sample += 10
                if elapsed >= next_swap:
                    self.use_model(versions[swap_index % 2])
                    swap_index += 1
                    next_swap += SWAP_SECONDS
                if elapsed >= next_train:
                    estimator = ("GaussianNB", "DecisionTreeClassifier")[len(self.jobs) % 2]
                    job = requests.post(f"{self.url}/train", headers=self.auth, timeout=60,
                                        json={"estimator": estimator, "dataset": "wine", "activate": False})  # fmt: skip
                    if job.status_code == 202:
                        self.jobs.append(job.json()["job_id"])
                    else:
                        self.note(f"train: {job.status_code} {job.text[:200]}")
                    next_train += TRAIN_SECONDS
                time.sleep(0.2)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)
        end = {pid: rss_mib(pid) for pid in worker_pids(self.process.pid)}
        self.metrics_size.append(self.metrics_series())
        jobs = [requests.get(f"{self.url}/train/jobs/{job}", headers=self.auth, timeout=30).json() for job in self.jobs]
        self.stop_service()
        return self.report(workers, warm or samples[0], end, jobs)

    def report(self, workers: list[int], warm: dict, end: dict, jobs: list[dict]) -> int:
        latencies = sorted(result[2] for result in self.results)
        failed = sum(not result[3] for result in self.results)
        wrong = sum(result[4] for result in self.results)
        mixed = sum(result[5] for result in self.results)
        kinds = {
            kind: sum(result[0] == kind for result in self.results)
            for kind in ("predict", "batch", "models", "metrics")
        }
        print(f"requests: {len(self.results)} ({kinds}); failed: {failed}; wrong-version: {wrong}; mixed: {mixed}")
        print(f"latency, all kinds: {percentiles(latencies)}")
        # Each kind on its own: a 200-row batch or a registry search is not slow for a one-row request's standards.
        for kind in kinds:
            print(f"latency, {kind}: {percentiles(sorted(r[2] for r in self.results if r[0] == kind))}")
        print(f"swaps: {len(self.swaps)}; training jobs: {[job.get('status') for job in jobs]}")
        print(f"/metrics series: {self.metrics_size[0]} after warm-up, {self.metrics_size[-1]} at the end")
        worst = 0.0
        for pid in workers:
            if pid not in end:
                print(f"worker {pid}: gone before the end (replaced)")
                worst = float("inf")
                continue
            growth = (end[pid] - warm[pid]) / warm[pid] * 100
            worst = max(worst, growth)
            print(f"worker {pid}: RSS {warm[pid]:.1f} MiB after warm-up ({self.warmup:.0f} s), "
                  f"{end[pid]:.1f} MiB at the end: {growth:+.1f} %")  # fmt: skip
        for error in self.errors:
            print(f"  error: {error}")
        passed = failed == 0 and wrong == 0 and mixed == 0 and worst < GROWTH_TARGET
        print("soak: PASS" if passed else "soak: FAIL")
        return 0 if passed else 1


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", "10"))
    clients = int(os.environ.get("SOAK_CLIENTS", "4"))
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        soak = Soak(minutes, clients, Path(folder))
        try:
            return soak.run()
        except Exception:
            log = Path(folder) / "gunicorn.log"
            if log.exists():
                print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
            raise
        finally:
            if getattr(soak, "process", None) is not None and soak.process.poll() is None:
                soak.stop_service()


if __name__ == "__main__":
    sys.exit(main())
