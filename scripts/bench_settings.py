"""What a setting costs under load: one-row /predict and a 10,000-row request, with it against without it.

The service as `make bench` starts it (gunicorn with gunicorn.conf.py, 2 workers, compiled LogisticRegression on
iris, a temporary store; no warm parent of training jobs), started afresh for each run, with runs alternating
with/without/without/with so a drifting machine weighs on both sides alike. Each run: a 3 s warm-up, then
`wrk -t2 -c16` for `--seconds` (p50, p99, req/s and the server's CPU time per request), then the median of 20 POSTs
of a 10,000-row batch. The medians over runs are compared with the budget given:

    # drift counting (issue 18): at most +3 % on p50 and CPU per request, +5 % on the batch
    .venv/bin/python scripts/bench_settings.py --with DRIFT_ENABLED=true --without DRIFT_ENABLED=false --budget 3,3,5
    # the prediction log (issue 17): under 5 % (inputs off), 8 % (inputs on); the batch under 10 %
    .venv/bin/python scripts/bench_settings.py --with PREDICTION_LOG=on --without PREDICTION_LOG=off --budget 5,5,10
    .venv/bin/python scripts/bench_settings.py --with PREDICTION_LOG_INPUTS=true --without PREDICTION_LOG=off --budget 8,8,10
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

from scripts.bench_measure import batch_body, batch_request, run_wrk, summary  # noqa: E402
from scripts.bench_peers import start_ours  # noqa: E402
from scripts.bench_processes import Processes, first_answer, free_port  # noqa: E402
from scripts.bench_report import machine  # noqa: E402
from scripts.bench_serving import IRIS_ROW, register_models  # noqa: E402

KEYS = ("p50_ms", "server_cpu_ms_per_request", "batch_ms")  # what --budget gives, in this order


def settings(pairs: list[str]) -> dict:
    return dict(pair.split("=", 1) for pair in pairs)


def one_run(processes, args, folder: Path, tracking_uri: str, enabled: bool, index: int, body: bytes, batch: bytes):
    for key in {*settings(args.with_), *settings(args.without)}:
        os.environ.pop(key, None)
    os.environ.update(settings(args.with_ if enabled else args.without))
    os.environ["TRAIN_WARM_START"] = "false"  # no warm parent of jobs warming up beside the measured load
    label = f"{'with' if enabled else 'without'}-{index}"
    with open(folder / f"{label}.log", "wb") as log:
        port = free_port()
        process = start_ours(processes, folder, tracking_uri, label, port, log)
        try:
            first_answer(process, time.monotonic(), port, "/predict", body, args.start_timeout)
            run_wrk(processes, args, process.pid, port, "/predict", body, 3.0)
            warm = run_wrk(processes, args, process.pid, port, "/predict", body, args.seconds)
            time.sleep(2.0)  # the prediction log's writers catch up with the load before the batch is timed
            warm["batch_ms"] = batch_request(port, batch, 20)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/drift", timeout=10) as answer:  # noqa: S310
                warm["drift_rows"] = json.loads(answer.read())["models"][0]["rows"]  # counting, or not
            return warm
        finally:
            processes.stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with", dest="with_", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--without", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--budget", default="3,3,5", help="most % added to p50, CPU per request, the batch")
    parser.add_argument("--pairs", type=int, default=2, help="with/without pairs: with, without, without, with, ...")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default="wrk")
    args = parser.parse_args()
    if not args.with_ and not args.without:
        args.with_, args.without = ["DRIFT_ENABLED=true"], ["DRIFT_ENABLED=false"]
    budget = dict(zip(KEYS, (float(v) for v in args.budget.split(",")), strict=True))
    if not shutil.which(args.wrk):
        print("bench_drift needs wrk: apt-get install wrk (or brew install wrk)", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="bench-settings-"))
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    registry, refs = register_models(tracking_uri)
    registry.set_active_model(refs["LogisticRegression"])
    body = json.dumps(IRIS_ROW).encode()
    batch = batch_body(10_000)
    order = [enabled for pair in range(args.pairs) for enabled in ((True, False) if pair % 2 == 0 else (False, True))]
    runs = {True: [], False: []}
    processes = Processes()
    try:
        for index, enabled in enumerate(order):
            warm = one_run(processes, args, folder, tracking_uri, enabled, index, body, batch)
            runs[enabled].append(warm)
            print(f"[bench-settings] {'with   ' if enabled else 'without'}: {summary(warm)}, "
                  f"10,000 rows {warm['batch_ms']:.1f} ms; /drift counted {warm['drift_rows']} rows", flush=True)  # fmt: skip
    finally:
        processes.stop_all()
    info = machine(args)
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), commit {info['commit']}, {info['date']}, load average "
          f"at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}; command: "
          f".venv/bin/python scripts/bench_settings.py {' '.join(sys.argv[1:])}\n")  # fmt: skip
    print(f"| measure | without: {' '.join(args.without)} (median of {len(runs[False])} runs) | "
          f"with: {' '.join(args.with_)} | change | budget | met |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for key, name in (("p50_ms", "one-row p50"), ("p99_ms", "one-row p99"), ("requests_per_s", "one-row req/s"),
                      ("server_cpu_ms_per_request", "server CPU per request"), ("batch_ms", "10,000-row request")):  # fmt: skip
        off = statistics.median(run[key] for run in runs[False])
        on = statistics.median(run[key] for run in runs[True])
        change = (on / off - 1) * 100
        limit = budget.get(key)
        met = "" if limit is None else ("yes" if change <= limit else "no")
        shown = "" if limit is None else f"+{limit:g} %"
        print(f"| {name} | {off:.3f} | {on:.3f} | {change:+.1f} % | {shown} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
