"""Start to first prediction only: this service against MLServer, alternately, in one run (make bench's start part).

`.venv/bin/python scripts/bench_start.py [--runs 3] [--model RandomForestClassifier]`: registers the model on iris in
a temporary MLflow store (as `make bench` does), then starts each server `--runs` times, one after the other, and
times each start to its first 200 prediction: this service as `make bench` starts it (gunicorn.conf.py, 2 workers,
an empty state folder, so the version is downloaded as on a new machine) and MLServer 1.7.1 (2 parallel workers,
the version exported with joblib), from `make bench`'s venv. Prints each start and the medians.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_peers import ensure_mlserver, export_for_mlserver, start_mlserver, start_ours, v2_body  # noqa: E402
from scripts.bench_processes import Processes, first_answer, free_port  # noqa: E402
from scripts.bench_serving import IRIS_ROW, MODELS, register_models  # noqa: E402


def time_start(processes: Processes, start, path: str, body: bytes, log_path: Path) -> float:
    """Seconds from just before the start to the first 200 at `path`; the server is stopped after."""
    with open(log_path, "wb") as log:
        port = free_port()
        started = time.monotonic()
        process = start(port, log)
        try:
            return first_answer(process, started, port, path, body, 120.0)[0]
        finally:
            processes.stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", choices=[name for name, _ in MODELS], default="RandomForestClassifier")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-start-"))
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    processes = Processes()
    figures: dict[str, list[float]] = {"this service": [], "MLServer": []}
    try:
        mlserver_bin = ensure_mlserver()
        registry, refs = register_models(tracking_uri)
        ref = refs[args.model]
        registry.set_active_model(ref)
        model_folder = export_for_mlserver(f"models:/{ref.name}/{ref.version}", folder / "mlserver")
        ours_body, theirs_body = json.dumps(IRIS_ROW).encode(), v2_body(IRIS_ROW, same_output=True)
        print(f"[start] load average {os.getloadavg()[0]:.1f}; {args.model}, 2 workers each", flush=True)
        for run in range(args.runs):
            label = f"run{run}"
            ours = time_start(
                processes,
                lambda port, log, label=label: start_ours(processes, folder, tracking_uri, label, port, log),
                "/predict", ours_body, folder / f"ours-{label}.log",
            )  # fmt: skip
            theirs = time_start(
                processes,
                lambda port, log: start_mlserver(processes, mlserver_bin, model_folder, port, log),
                "/v2/models/iris/infer", theirs_body, folder / f"mlserver-{label}.log",
            )  # fmt: skip
            figures["this service"].append(ours)
            figures["MLServer"].append(theirs)
            print(f"[start] run {run + 1}: this service {ours:.2f} s, MLServer {theirs:.2f} s", flush=True)
    finally:
        processes.stop_all()
        shutil.rmtree(folder, ignore_errors=True)
    ours, theirs = statistics.median(figures["this service"]), statistics.median(figures["MLServer"])
    print(f"median start to first prediction: this service {ours:.2f} s, MLServer {theirs:.2f} s ({ours / theirs:.2f}x);"
          f" load average at the end {os.getloadavg()[0]:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
