"""Server CPU per one-row /predict: this tree against an earlier commit, to price the per-request active check.

Run: .venv/bin/python scripts/bench_active_check.py --before ec8587c [--seconds 10 --rounds 2]

The earlier commit is exported (`git archive`) into a temporary folder and run with this tree's venv. Both
serve the same compiled LogisticRegression (iris) from one SQLite store, with gunicorn.conf.py and 2 workers,
driven by the same wrk command as `make bench` (one-row JSON body). They take turns, `--rounds` times each,
so both sides see the same load on a shared machine; server CPU time per request (the master and its
workers, from /proc) is the figure: unlike req/s, it does not depend much on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The wrk helpers, shared with `make bench`.
from scripts.bench_measure import run_wrk, summary  # noqa: E402
from scripts.bench_peers import TOKEN  # noqa: E402
from scripts.bench_processes import BIN, ROOT, Processes, first_answer, free_port  # noqa: E402
from scripts.bench_serving import IRIS_ROW  # noqa: E402


def export(commit: str, folder: Path) -> Path:
    """The tree of `commit`, written to `folder` (nothing in the repository changes)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def start(processes, tree: Path, folder: Path, label: str, tracking_uri: str, port: int, log):
    env = {**os.environ, "WEB_CONCURRENCY": "2", "HOST": "127.0.0.1", "PORT": str(port),
           "MLFLOW_TRACKING_URI": tracking_uri, "STATE_DIR": str(folder / f"state-{label}"), "API_TOKEN": TOKEN,
           "BOOTSTRAP_DEFAULT_MODEL": "false", "LOG_LEVEL": "warning",
           "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="prometheus-", dir=folder)}  # fmt: skip
    command = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"]
    return processes.start(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)


def measure(processes, args, tree: Path, folder: Path, label: str, tracking_uri: str, body: bytes) -> dict:
    port = free_port()
    with open(folder / f"{label}.log", "a") as log:
        process = start(processes, tree, folder, label, tracking_uri, port, log)
        try:
            first_answer(process, time.monotonic(), port, "/predict", body, timeout=120)
            run_wrk(processes, args, process.pid, port, "/predict", body, args.warmup_seconds)
            return run_wrk(processes, args, process.pid, port, "/predict", body, args.seconds)
        finally:
            processes.stop(process)


def check_cost(folder: Path, number: int = 200_000) -> dict[str, float]:
    """Nanoseconds per check, in this process: the pointer file's stat (before) and the mapped generation (after)."""
    import timeit

    from kernel.registry import ModelRef
    from serving.pointer import Generation, Pointer

    pointer = Pointer(folder / "check-cost")
    pointer.write(ModelRef("bench-lr", "1"))
    generation = Generation(pointer.state_dir, pointer)
    return {name: min(timeit.repeat(check, number=number, repeat=5)) / number * 1e9
            for name, check in (("stat", pointer.stat_key), ("generation", generation.value))}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the merge base)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--wrk", default="/usr/bin/wrk")
    args = parser.parse_args()
    args.warmup_seconds = min(3.0, args.seconds)
    folder = Path(tempfile.mkdtemp(prefix="bench-active-"))
    trees = {"before": export(args.before, folder / "before"), "after": ROOT}
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    # Registered by the earlier tree's batch job, which writes both records that side may read.
    subprocess.run([sys.executable, "-m", "training", "--estimator", "LogisticRegression", "--dataset", "iris",
                    "--model-name", "bench-lr"], cwd=trees["before"], check=True, capture_output=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})  # fmt: skip
    body = json.dumps(IRIS_ROW).encode()
    processes, runs = Processes(), {"before": [], "after": []}
    try:
        for round_ in range(args.rounds):
            for label, tree in trees.items():
                run = measure(processes, args, tree, folder, f"{label}-{round_}", tracking_uri, body)
                runs[label].append(run)
                print(f"[bench] {label} round {round_ + 1}: {summary(run)}", flush=True)
    finally:
        processes.stop_all()
    command = runs["after"][0]["command"]
    print(f"\nwrk: `{command}`, {args.seconds:.0f} s per run after a {args.warmup_seconds:.0f} s warm-up")
    print("| tree | server CPU ms/request (each run) | req/s (each run) | p50 ms |")
    print("|---|---|---|---|")
    for label in ("before", "after"):
        cpu = ", ".join(f"{run['server_cpu_ms_per_request']:.3f}" for run in runs[label])
        rate = ", ".join(f"{run['requests_per_s']:.0f}" for run in runs[label])
        p50 = ", ".join(f"{run['p50_ms']:.2f}" for run in runs[label])
        print(f"| {label} ({args.before if label == 'before' else 'this tree'}) | {cpu} | {rate} | {p50} |")
    costs = check_cost(folder)
    print(
        f"\nthe check alone, in one process: stat {costs['stat']:.0f} ns, mapped generation {costs['generation']:.0f} ns"
    )
    flagged = [run for label in runs for run in runs[label] if any(run["errors"].values())]
    return 2 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
