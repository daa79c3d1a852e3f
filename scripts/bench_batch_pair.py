"""The 10,000-row request on services side by side, each with its own settings, timed in alternating blocks.

Each `--service` is a service as `make bench` starts it (gunicorn with gunicorn.conf.py, 2 workers, compiled
LogisticRegression on iris, its own temporary store), with the settings given (`NAME=VALUE,NAME=VALUE`; `ROOT=`
runs another checkout's code, for a before/after). After a warm-up, each block POSTs the batch `--per-block` times
on one keep-alive connection to each service in turn, with a pause before each (the previous block's writers catch
up), so every service is measured moments apart from the others: the change against the first service is far
steadier than between services started one after the other (`scripts/bench_settings.py`).

    # the prediction log's cost on the batch (issue 17)
    .venv/bin/python scripts/bench_batch_pair.py --service PREDICTION_LOG=off --service PREDICTION_LOG=on
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import bench_peers  # noqa: E402
from scripts.bench_measure import batch_body  # noqa: E402
from scripts.bench_processes import ROOT, Processes, first_answer, free_port  # noqa: E402
from scripts.bench_report import machine  # noqa: E402
from scripts.bench_serving import IRIS_ROW, register_models  # noqa: E402


def start(processes, folder: Path, index: int, settings: dict, start_timeout: float):
    store = folder / f"service-{index}"
    store.mkdir()
    tracking_uri = f"sqlite:///{store}/mlflow.db"
    registry, refs = register_models(tracking_uri)
    registry.set_active_model(refs["LogisticRegression"])
    saved = dict(os.environ)
    os.environ.update({"TRAIN_WARM_START": "false", **{k: v for k, v in settings.items() if k != "ROOT"}})
    bench_peers.ROOT = Path(settings.get("ROOT", ROOT))  # whose code the service runs
    try:
        port = free_port()
        with open(store / "service.log", "wb") as log:
            process = bench_peers.start_ours(processes, store, tracking_uri, f"s{index}", port, log)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        bench_peers.ROOT = ROOT
    first_answer(process, time.monotonic(), port, "/predict", json.dumps(IRIS_ROW).encode(), start_timeout)
    return port


def timed(connection: http.client.HTTPConnection, body: bytes) -> float:
    started = time.perf_counter()
    connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200:
        raise RuntimeError(f"/predict with the batch answered {response.status}: {answer[:300]!r}")
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", action="append", required=True, metavar="NAME=VALUE,...")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--per-block", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds before each block")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default="wrk", help="only named in the machine line")
    args = parser.parse_args()
    services = [dict(pair.split("=", 1) for pair in text.split(",") if pair) for text in args.service]
    body = batch_body(args.rows)
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-pair-"))
    processes = Processes()
    try:
        ports = [
            start(processes, folder, index, settings, args.start_timeout) for index, settings in enumerate(services)
        ]
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port in ports]
        for connection in connections:  # warm-up
            for _ in range(args.per_block):
                timed(connection, body)
        times: list[list[float]] = [[] for _ in connections]
        for _ in range(args.blocks):
            for index, connection in enumerate(connections):
                time.sleep(args.pause)
                times[index].extend(timed(connection, body) for _ in range(args.per_block))
    finally:
        processes.stop_all()
    info = machine(args)
    print(f"\nmachine: {info['nproc']} CPUs ({info['cpu']}), commit {info['commit']}, {info['date']}; command: "
          f".venv/bin/python scripts/bench_batch_pair.py {' '.join(sys.argv[1:])}\n")  # fmt: skip
    print(f"| service | median ms ({args.blocks * args.per_block} requests of {args.rows:,} rows) | p90 ms | change |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(times[0])
    for settings, measured in zip(args.service, times, strict=True):
        median = statistics.median(measured)
        p90 = statistics.quantiles(measured, n=10)[-1]
        print(f"| {settings} | {median:.2f} | {p90:.2f} | {(median / base - 1) * 100:+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
