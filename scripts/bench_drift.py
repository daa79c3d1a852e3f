"""What drift counting costs under load: one-row /predict and a 10,000-row request, DRIFT_ENABLED on against off.

The service as `make bench` starts it (gunicorn with gunicorn.conf.py, 2 workers, compiled LogisticRegression on
iris, a temporary store), started afresh for each run, with runs alternating on/off/off/on so a drifting machine
weighs on both sides alike. Each run: a 3 s warm-up, then `wrk -t2 -c16` for `--seconds` (p50, p99, req/s and the
server's CPU time per request), then the median of 20 POSTs of a 10,000-row batch. The medians over runs are
compared; the budget (issue 18) is at most +3 % on p50 and on CPU per request, at most +5 % on the batch.

    .venv/bin/python scripts/bench_drift.py [--pairs 2] [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import bench_serving as bench  # noqa: E402

BUDGET = {"p50_ms": 3.0, "server_cpu_ms_per_request": 3.0, "batch_ms": 5.0}


def one_run(processes, args, folder: Path, tracking_uri: str, enabled: bool, index: int, body: bytes, batch: bytes):
    os.environ["DRIFT_ENABLED"] = "true" if enabled else "false"
    label = f"{'on' if enabled else 'off'}-{index}"
    with open(folder / f"{label}.log", "wb") as log:
        port = bench.free_port()
        process = bench.start_ours(processes, folder, tracking_uri, label, port, log)
        try:
            bench.first_answer(process, bench.time.monotonic(), port, "/predict", body, args.start_timeout)
            bench.run_wrk(processes, args, process.pid, port, "/predict", body, 3.0)
            warm = bench.run_wrk(processes, args, process.pid, port, "/predict", body, args.seconds)
            bench.time.sleep(2.0)  # the prediction log's writers catch up with the load before the batch is timed
            warm["batch_ms"] = bench.batch_request(port, batch, 20)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/drift", timeout=10) as answer:  # noqa: S310
                warm["drift_rows"] = bench.json.loads(answer.read())["models"][0]["rows"]  # counting, or not
            return warm
        finally:
            processes.stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="on/off pairs, in the order on, off, off, on, ...")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default="wrk")
    args = parser.parse_args()
    if not bench.shutil.which(args.wrk):
        print("bench_drift needs wrk: apt-get install wrk (or brew install wrk)", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    registry, refs = bench.register_models(tracking_uri)
    registry.set_active_model(refs["LogisticRegression"])
    body = bench.json.dumps(bench.IRIS_ROW).encode()
    batch = bench.batch_body(10_000)
    order = [enabled for pair in range(args.pairs) for enabled in ((True, False) if pair % 2 == 0 else (False, True))]
    runs = {True: [], False: []}
    processes = bench.Processes()
    try:
        for index, enabled in enumerate(order):
            warm = one_run(processes, args, folder, tracking_uri, enabled, index, body, batch)
            runs[enabled].append(warm)
            print(f"[bench-drift] drift {'on ' if enabled else 'off'}: {bench.summary(warm)}, "
                  f"10,000 rows {warm['batch_ms']:.1f} ms; /drift counted {warm['drift_rows']} rows", flush=True)  # fmt: skip
    finally:
        processes.stop_all()
    info = bench.machine(args)
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), commit {info['commit']}, {info['date']}, load average "
          f"at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())}; command: "
          f".venv/bin/python scripts/bench_drift.py --pairs {args.pairs} --seconds {args.seconds:g}\n")  # fmt: skip
    print("| measure | drift off (median of runs) | drift on | change | budget | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, name in (("p50_ms", "one-row p50"), ("p99_ms", "one-row p99"), ("requests_per_s", "one-row req/s"),
                      ("server_cpu_ms_per_request", "server CPU per request"), ("batch_ms", "10,000-row request")):  # fmt: skip
        off = statistics.median(run[key] for run in runs[False])
        on = statistics.median(run[key] for run in runs[True])
        change = (on / off - 1) * 100
        budget = BUDGET.get(key)
        met = "" if budget is None else ("yes" if change <= budget else "no")
        shown = "" if budget is None else f"+{budget:g} %"
        print(f"| {name} | {off:.3f} | {on:.3f} | {change:+.1f} % | {shown} | {met} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
