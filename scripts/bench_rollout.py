"""What a rollout costs under load: one-row /predict with no rollout, a sticky canary at 50 %, a shadow at 100 %.

The service as `make bench` starts it (gunicorn with gunicorn.conf.py, 2 workers, a temporary store), serving a
compiled LogisticRegression on iris; the candidate is a second LogisticRegression version trained on the same data
(the same answers: the cost measured is the rollout's, not another model's). Each request carries a random
`X-User-Id` (scripts/bench_keyed.lua), so a canary hashes a key per request. Runs alternate none, canary, shadow,
shadow, canary, none (`--pairs` times), each on a fresh service; each run is a 3 s warm-up, then `wrk -c1` (below
saturation on 2 CPUs), `wrk -t2 -c4` and `wrk -t2 -c16` (both saturate 2 CPUs) for `--seconds` each. The medians per mode are compared with
the issue's budgets: a canary adds under 5 % to p50 and to server CPU per request; a shadow adds under 5 % to p50
at -c4, and at -c16 sheds (its drops are counted) with p99 within +15 %.

    .venv/bin/python scripts/bench_rollout.py            # make bench-rollout
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


def one_run(processes, args, folder: Path, tracking_uri: str, candidate, mode: str, index: int) -> dict:
    os.environ["TRAIN_WARM_START"] = "false"
    body = json.dumps(IRIS_ROW).encode()
    with open(folder / f"{mode}-{index}.log", "wb") as log:
        port = free_port()
        process = start_ours(processes, folder, tracking_uri, f"{mode}-{index}", port, log)
        try:
            first_answer(process, time.monotonic(), port, "/predict", body, args.start_timeout)
            if mode != "none":
                spec = {"candidate": candidate.as_dict(), "mode": mode}
                spec.update({"steps": [50], "sticky": {"header": "X-User-Id"}} if mode == "canary"
                            else {"shadow_percent": 100})  # fmt: skip
                call(port, "POST", "/rollout", spec)
            out = {}
            args.connections, args.threads = 4, 2
            run_wrk(processes, args, process.pid, port, "/predict", body, 3.0)
            for connections in LOADS:
                args.connections, args.threads = connections, min(2, connections)
                out[connections] = run_wrk(processes, args, process.pid, port, "/predict", body, args.seconds)
            if mode != "none":
                out["rollout"] = call(port, "GET", "/rollout")
                call(port, "DELETE", "/rollout")
            return out
        finally:
            processes.stop(process)


def report(runs: dict, args) -> None:
    def median(mode, connections, key):
        return statistics.median(run[connections][key] for run in runs[mode])

    info = machine(args)
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), commit {info['commit']}, {info['date']}; command: "
          f".venv/bin/python scripts/bench_rollout.py {' '.join(sys.argv[1:])} (medians of {args.pairs} runs)\n")  # fmt: skip
    print("| load | measure | no rollout | canary 50 % (sticky) | change | shadow 100 % | change |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for connections in LOADS:
        for key, name in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("requests_per_s", "req/s"),
                          ("server_cpu_ms_per_request", "server CPU ms/request")):  # fmt: skip
            base = median("none", connections, key)
            cells = []
            for mode in ("canary", "shadow"):
                value = median(mode, connections, key)
                cells += [f"{value:.3f}", f"{(value / base - 1) * 100:+.1f} %"]
            print(f"| -c{connections} | {name} | {base:.3f} | {' | '.join(cells)} |")
    for run in runs["shadow"]:
        arm = run["rollout"]["arms"]["shadow"]
        print(f"shadow run: {arm['requests']} rows scored by the candidate, {arm['dropped']} dropped (counted), "
              f"agreement {run['rollout']['shadow']['agreement']}")  # fmt: skip
    for run in runs["canary"]:
        arms = run["rollout"]["arms"]
        share = arms["candidate"]["requests"] / max(1, arms["candidate"]["requests"] + arms["stable"]["requests"])
        print(f"canary run: {share:.1%} of the requests on the candidate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default="wrk")
    args = parser.parse_args()
    args.connections = 4
    if not shutil.which(args.wrk):
        print("bench_rollout needs wrk: apt-get install wrk (or brew install wrk)", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    candidate = register(tracking_uri)
    order = [m for pair in range(args.pairs) for m in (MODES if pair % 2 == 0 else MODES[::-1])]
    runs: dict[str, list] = {mode: [] for mode in MODES}
    processes = Processes()
    try:
        for index, mode in enumerate(order):
            run = one_run(processes, args, folder, tracking_uri, candidate, mode, index)
            runs[mode].append(run)
            print(f"[bench-rollout] {mode:6}: " + ", ".join(
                f"-c{c} {run[c]['requests_per_s']:.0f} req/s p50 {run[c]['p50_ms']:.2f} ms p99 {run[c]['p99_ms']:.2f} ms "
                f"CPU {run[c]['server_cpu_ms_per_request']:.3f} ms" for c in LOADS), flush=True)  # fmt: skip
    finally:
        processes.stop_all()
    report(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
