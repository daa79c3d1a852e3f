"""This service against `mlflow models serve` and MLServer on the same registered versions, in one run (`make bench`).

Run: make bench   (or .venv/bin/python scripts/bench_serving.py [--seconds 10]; BENCH_SECONDS=3 shortens it)

On a temporary MLflow store (SQLite and an artifacts folder in a temp dir) it registers LogisticRegression
and RandomForestClassifier(n_estimators=100) on iris with the project's own training code. For each model
it starts this service (gunicorn with gunicorn.conf.py, 2 workers, serving that version) and then
`mlflow models serve -w 2 --env-manager local` on the same version, one after the other, and for each:
- times process start to the first 200 prediction;
- drives it with wrk (same connections, threads and duration for both, one-row JSON bodies): a "cold" run
  that starts the moment the first prediction answers, a warm-up, then the measured warm run; for this
  service also a "recycle" run during which one worker is stopped gracefully (what gunicorn's max_requests
  does) and the master forks a fresh one;
- reads each worker's resident memory after the load;
- for this service, times a 10,000-row POST /predict (median of --repeat) next to scikit-learn's own
  `json.loads` + `pandas.DataFrame` + `predict_proba` on the same body, in this process, on the same model.
MLServer (SeldonIO's inference server, scikit-learn runtime, V2 protocol) is the second peer: installed on
demand into its own venv (build/bench/mlserver-venv: MLServer 1.7.1, uvloop below 0.22, which 1.7.1 needs,
and this venv's scikit-learn, numpy, pandas and scipy), serving the same registered version exported as
its runtime expects (joblib), with `parallel_workers` 2. It is timed and loaded like the others, twice per
model: asking for the same output as ours (labels and probabilities: outputs `predict` and `predict_proba`)
and with its default (labels only). Requests carry one input per column and `content_type: "pd"` (the
pipelines select columns by name). --no-mlserver leaves it out.
The floor: a bare Flask handler (scripts/bench_bare_flask.py) under the same gunicorn settings; one-row
/predict is reported as a share of its throughput.
It prints markdown tables, writes them with every raw figure to build/bench/ (results.md, results.json),
and stops every process it started, also on failure or Ctrl-C. A wrk run with socket errors or non-2xx
answers is flagged in the table and makes the command exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The parts, by job: the processes and /proc, the servers it starts, the load and measures, the report.
from scripts.bench_measure import (  # noqa: E402
    batch_body,
    batch_request,
    measure_server,
    recycle_run,
    run_wrk,
    sklearn_in_process,
    summary,
)
from scripts.bench_peers import (  # noqa: E402
    MLSERVER_VENV,
    MLSERVER_VERSION,
    WORKERS,
    all_below,
    ensure_mlserver,
    export_for_mlserver,
    our_workers,
    start_bare_flask,
    start_mlserver,
    start_ours,
    start_theirs,
    their_workers,
    v2_body,
)
from scripts.bench_processes import ROOT, Processes  # noqa: E402
from scripts.bench_report import machine, peers_table, table  # noqa: E402

OUT = ROOT / "build" / "bench"
MODELS = (("LogisticRegression", {}), ("RandomForestClassifier", {"n_estimators": 100}))
IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the try/finally that stops the processes


# ---- the run -----------------------------------------------------------------------------------------------
def register_models(tracking_uri: str) -> dict:
    """Train and register both models on iris with the project's training code; nothing activated yet."""
    from kernel.registry import ModelRef, Registry
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    registry = Registry(tracking_uri, "model-serving")
    iris = load_builtin("iris")
    refs = {}
    for estimator, params in MODELS:
        result = run_training(registry, TrainingSpec(estimator, params, activate=False), iris)
        refs[estimator] = ModelRef(**result["model"])
    return registry, refs


def bench_model(processes, args, folder: Path, tracking_uri: str, registry, ref, batch: bytes) -> dict:
    registry.set_active_model(ref)  # what this service serves from its start
    model_uri = f"models:/{ref.name}/{ref.version}"
    one_row = json.dumps(IRIS_ROW).encode() if args.ours_path == "/predict" else None
    records = json.dumps({"dataframe_records": [IRIS_ROW]}).encode()
    label = ref.name.split("-", 1)[1]

    def ours_extra(process, port) -> dict:
        extra = {"recycle": recycle_run(processes, args, process.pid, port, args.ours_path, one_row or records)}
        extra["batch_predict_ms"] = batch_request(port, batch, args.repeat)
        return extra

    print(f"[bench] {label}: this service (gunicorn, {WORKERS} workers)", flush=True)
    ours = measure_server(
        processes, args, folder, f"ours-{label}",
        lambda port, log: start_ours(processes, folder, tracking_uri, label, port, log),
        args.ours_path, one_row or records, our_workers, extra=ours_extra,
    )  # fmt: skip
    print(f"[bench] {label}: mlflow models serve ({WORKERS} workers)", flush=True)
    theirs = measure_server(
        processes, args, folder, f"mlflow-{label}",
        lambda port, log: start_theirs(processes, folder, tracking_uri, model_uri, port, log),
        "/invocations", records, their_workers,
    )  # fmt: skip
    result = {"version": ref.as_dict(), "ours": ours, "theirs": theirs}
    if args.mlserver_bin is not None:
        print(f"[bench] {label}: MLServer {MLSERVER_VERSION} ({WORKERS} parallel workers)", flush=True)
        model_folder = export_for_mlserver(model_uri, folder / f"mlserver-{label}")
        v2_path = "/v2/models/iris/infer"
        default_body = v2_body(IRIS_ROW, same_output=False)

        def mlserver_extra(process, port) -> dict:
            default = run_wrk(processes, args, process.pid, port, v2_path, default_body, args.seconds)
            print(f"[bench]   its default output (labels only): {summary(default)}", flush=True)
            return {"default_output": default}

        result["mlserver"] = measure_server(
            processes, args, folder, f"mlserver-{label}",
            lambda port, log: start_mlserver(processes, args.mlserver_bin, model_folder, port, log),
            v2_path, v2_body(IRIS_ROW, same_output=True), all_below, extra=mlserver_extra,
        )  # fmt: skip
    print(f"[bench] {label}: scikit-learn in this process, {args.rows:,} rows", flush=True)
    result["batch"] = {
        "predict_ms": ours.pop("batch_predict_ms"),
        "sklearn_ms": sklearn_in_process(model_uri, batch, args.repeat),
    }
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_seconds = float(os.environ.get("BENCH_SECONDS") or 10)
    parser.add_argument("--seconds", type=float, default=default_seconds, help="warm run (env BENCH_SECONDS)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--ours-path", choices=("/predict", "/invocations"), default="/predict",
                        help="/predict takes the one-row form; /invocations the same dataframe_records body as mlflow")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (store and server logs)")
    parser.add_argument("--no-mlserver", dest="mlserver", action="store_false",
                        help=f"leave out MLServer {MLSERVER_VERSION} (otherwise installed on first use into {MLSERVER_VENV})")  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        default=os.environ.get("BENCH_PROFILE", "").lower() in ("1", "true", "yes"),
        help="py-spy one worker of each server during the warm run (env BENCH_PROFILE=1); it costs some CPU",
    )
    args = parser.parse_args()
    args.cold_seconds = min(5.0, args.seconds)
    args.warmup_seconds = min(3.0, args.seconds)
    return args


def main() -> int:
    args = parse_args()
    if not (os.path.isfile(args.wrk) and os.access(args.wrk, os.X_OK)):
        print(f"make bench drives both services with wrk, which is not installed ({args.wrk}): "
              "`sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk` (macOS), or pass --wrk PATH.",
              file=sys.stderr)  # fmt: skip
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even when started in the background
    info = machine(args)
    command = "make bench" if os.environ.get("MAKELEVEL") else "python scripts/bench_serving.py"
    seconds = f"BENCH_SECONDS={os.environ['BENCH_SECONDS']} " if os.environ.get("BENCH_SECONDS") else ""
    info["command"] = seconds + " ".join([command, *sys.argv[1:]])
    folder = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    processes = Processes()
    try:
        args.mlserver_bin = ensure_mlserver() if args.mlserver else None
        print(
            f"[bench] the floor: a bare Flask handler under the same gunicorn settings ({WORKERS} workers)", flush=True
        )
        results = {"models": {}}
        results["bare_flask"] = measure_server(
            processes, args, folder, "bare-flask", lambda port, log: start_bare_flask(processes, folder, port, log),
            "/predict", json.dumps(IRIS_ROW).encode(), our_workers,
        )  # fmt: skip
        print(f"[bench] registering LogisticRegression and RandomForest(100) on iris in {folder}", flush=True)
        registry, refs = register_models(tracking_uri)
        batch = batch_body(args.rows)
        for estimator, _ in MODELS:
            results["models"][estimator] = bench_model(
                processes, args, folder, tracking_uri, registry, refs[estimator], batch
            )
    finally:
        processes.stop_all()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    info["load_average_at_end"] = os.getloadavg()
    markdown = table(results, info, args) + "\n\n" + peers_table(results, args)
    print("\n" + markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown + "\n")
    (args.out / "results.json").write_text(json.dumps({"machine": info, **results}, indent=2) + "\n")
    print(f"\n[bench] written to {args.out / 'results.md'} and {args.out / 'results.json'}")
    failed = [
        f"{name} {side} {run}"
        for name, result in results["models"].items()
        for side in ("ours", "theirs", "mlserver")
        for run in ("cold", "warm", "recycle", "default_output")
        if side in result and run in result[side] and any(result[side][run]["errors"].values())
    ]
    if failed:
        print(f"[bench] runs with errors (flagged ⚠ in the table): {', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
