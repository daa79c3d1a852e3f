"""What a rollout costs under load: one-row /predict with no rollout, a sticky canary at 50 %, a shadow at 100 %.

Three services as `make bench` starts them (gunicorn with gunicorn.conf.py, 2 workers), side by side, each with its
own temporary store (a rollout lives in its registry), each serving a compiled LogisticRegression on iris; the
candidate is a second LogisticRegression version trained on the same data (the same answers: the cost measured is
the rollout's, not another model's). One service runs no rollout, one a sticky canary at 50 %, one a shadow at
100 %. Each request carries a random `X-User-Id` (scripts/bench_keyed.lua), so a canary hashes a key per request.

The runs interleave: for each load (`wrk -c1`, below saturation on 2 CPUs; `-c4` and `-c16`, both saturating
them), `--rounds` rounds, each a `--seconds` run on every service in turn (the order reversed every other round),
while the other two sit idle. Each round gives a paired ratio to the service without a rollout, measured moments
apart, so a machine that drifts over minutes weighs on both sides alike (separate fresh services per run, one
after the other, disagreed by 5-10 % between runs of the same mode). The medians of the paired ratios are compared
with the issue's budgets: a canary adds under 5 % to p50 and to server CPU per request; a shadow adds under 5 % to
p50 at -c4, and at -c16 sheds (its drops are counted) with p99 within +15 %.

    .venv/bin/python scripts/bench_rollout.py            # make bench-rollout (and the last part of make bench)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import bench_measure  # noqa: E402
from scripts.bench_measure import run_wrk  # noqa: E402
from scripts.bench_peers import TOKEN, start_ours  # noqa: E402
from scripts.bench_processes import Processes, first_answer, free_port  # noqa: E402
from scripts.bench_report import machine  # noqa: E402
from scripts.bench_serving import IRIS_ROW  # noqa: E402

bench_measure.LUA = Path(__file__).resolve().parent / "bench_keyed.lua"
MODES = ("none", "canary", "shadow")
LOADS = (1, 4, 16)  # wrk connections: -c1 leaves a CPU idle on 2 CPUs, -c4 and -c16 saturate them


def register(tracking_uri: str):
    from kernel.registry import ModelRef, Registry
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    registry = Registry(tracking_uri, "model-serving")
    iris = load_builtin("iris")
    refs = [ModelRef(**run_training(registry, TrainingSpec("LogisticRegression", {}, activate=False), iris)["model"])
            for _ in range(2)]  # fmt: skip
    registry.set_active_model(refs[0])
    return refs[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - loopback
        return json.loads(answer.read())


def start_service(processes, args, folder: Path, mode: str) -> tuple:
    """A service with its own store; its rollout started (the rollout lives in the store: one per service)."""
    store = folder / mode
    store.mkdir()
    tracking_uri = f"sqlite:///{store}/mlflow.db"
    candidate = register(tracking_uri)
    os.environ["TRAIN_WARM_START"] = "false"
    port = free_port()
    with open(folder / f"{mode}.log", "wb") as log:
        process = start_ours(processes, store, tracking_uri, mode, port, log)
    first_answer(process, time.monotonic(), port, "/predict", json.dumps(IRIS_ROW).encode(), args.start_timeout)
    if mode != "none":
        spec = {"candidate": candidate.as_dict(), "mode": mode}
        spec.update({"steps": [50], "sticky": {"header": "X-User-Id"}} if mode == "canary" else {"shadow_percent": 100})
        call(port, "POST", "/rollout", spec)
    return process, port


def interleaved(processes, args, services: dict) -> dict:
    """{connections: {mode: [run, ...]}}: every round runs each service once, in turn, at that load."""
    body = json.dumps(IRIS_ROW).encode()
    runs: dict = {connections: {mode: [] for mode in MODES} for connections in LOADS}
    for mode in MODES:  # a warm-up on each
        args.connections, args.threads = 4, 2
        run_wrk(processes, args, services[mode][0].pid, services[mode][1], "/predict", body, 3.0)
    for connections in LOADS:
        args.connections, args.threads = connections, min(2, connections)
        for index in range(args.rounds):
            for mode in MODES if index % 2 == 0 else MODES[::-1]:
                process, port = services[mode]
                time.sleep(0.3)  # the previous run's queues drained
                run = run_wrk(processes, args, process.pid, port, "/predict", body, args.seconds)
                runs[connections][mode].append(run)
            print(f"[bench-rollout] -c{connections} round {index + 1}: " + ", ".join(
                f"{mode} {runs[connections][mode][-1]['requests_per_s']:.0f} req/s p50 "
                f"{runs[connections][mode][-1]['p50_ms']:.2f} ms" for mode in MODES), flush=True)  # fmt: skip
    return runs


BUDGETS = {("canary", "p50_ms"): 5.0, ("canary", "server_cpu_ms_per_request"): 5.0, ("shadow", "p50_ms", 4): 5.0,
           ("shadow", "p99_ms", 16): 15.0}  # fmt: skip


def report(runs: dict, rollouts: dict, args) -> None:
    info = machine(args)
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), commit {info['commit']}, {info['date']}; command: "
          f".venv/bin/python scripts/bench_rollout.py {' '.join(sys.argv[1:])} ({args.rounds} interleaved rounds of "
          f"{args.seconds:g} s per load; change: the median of the paired ratios, with their range)\n")  # fmt: skip
    print("| load | measure | no rollout | canary 50 % (sticky) | change | shadow 100 % | change |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for connections in LOADS:
        for key, name in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("requests_per_s", "req/s"),
                          ("server_cpu_ms_per_request", "server CPU ms/request")):  # fmt: skip
            base = runs[connections]["none"]
            cells = []
            for mode in ("canary", "shadow"):
                ratios = [(run[key] / other[key] - 1) * 100 for run, other in zip(runs[connections][mode], base)]
                change = statistics.median(ratios)
                budget = BUDGETS.get((mode, key), BUDGETS.get((mode, key, connections)))
                verdict = "" if budget is None else f" ({'met' if change < budget else 'missed'}: < {budget:g} %)"
                cells += [f"{statistics.median(run[key] for run in runs[connections][mode]):.3f}",
                          f"{change:+.1f} % [{min(ratios):+.1f}, {max(ratios):+.1f}]{verdict}"]  # fmt: skip
            print(
                f"| -c{connections} | {name} | {statistics.median(run[key] for run in base):.3f} | {' | '.join(cells)} |"
            )
    shadow, canary = rollouts["shadow"], rollouts["canary"]
    arm = shadow["arms"]["shadow"]
    print(f"shadow: {arm['requests']} rows scored by the candidate, {arm['dropped']} dropped (counted), "
          f"agreement {shadow['shadow']['agreement']}")  # fmt: skip
    arms = canary["arms"]
    share = arms["candidate"]["requests"] / max(1, arms["candidate"]["requests"] + arms["stable"]["requests"])
    print(f"canary: {share:.1%} of the requests on the candidate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per load")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 4.0)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default="wrk")
    args = parser.parse_args()
    args.connections = 4
    if not shutil.which(args.wrk):
        print("bench_rollout needs wrk: apt-get install wrk (or brew install wrk)", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    processes = Processes()
    try:
        services = {mode: start_service(processes, args, folder, mode) for mode in MODES}
        runs = interleaved(processes, args, services)
        rollouts = {mode: call(services[mode][1], "GET", "/rollout") for mode in ("canary", "shadow")}
    finally:
        processes.stop_all()
    report(runs, rollouts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
