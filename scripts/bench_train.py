"""`make bench-train`: how fast a small training job goes from POST /train to succeeded, in one run.

Run: .venv/bin/python scripts/bench_train.py [--jobs 12]
On a temporary SQLite store, with the local executor (TRAIN_EXECUTOR=local, the fork server warm):
- POST→succeeded for LogisticRegression on iris (asynchronous, polled every 20 ms), and a waited /train;
- the same fit logged by a bare MLflow script (fit + mlflow.sklearn.log_model(registered_model_name=...)),
  warm, in this same process;
- 12 small jobs (LR and RF on iris and wine) on TRAIN_WORKER_CONCURRENCY=1, in jobs a minute;
- the fork server's RSS, and a job's process's peak RSS.
Prints a markdown table. The Celery figures are not measured by this script yet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "bench-train-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
SMALL = [(e, d) for e in ("LogisticRegression", "RandomForestClassifier") for d in ("iris", "wine")]


def post_to_succeeded(client, body: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    location = client.post("/train", json=body, headers=HEADERS).json["location"]
    while (job := client.get(location, headers=HEADERS).json)["status"] not in ("succeeded", "failed"):
        time.sleep(0.02)
    return time.perf_counter() - started, job


def bare_mlflow(uri: str) -> float:
    """The same pipeline fitted and logged by a plain MLflow script (warm: this process imported everything)."""
    import mlflow
    import mlflow.sklearn

    from training.datasets import load_builtin
    from training.pipeline import build_pipeline, split

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name("bare") is None:  # its artifacts beside the database, not in ./mlruns
        mlflow.create_experiment("bare", artifact_location=uri.removeprefix("sqlite:///").replace("mlflow.db", "bare"))
    mlflow.set_experiment("bare")
    dataset = load_builtin("iris")
    started = time.perf_counter()
    train_x, _, train_y, _ = split(dataset.features, dataset.labels)
    with mlflow.start_run():
        model = build_pipeline(dataset.features, "LogisticRegression", {}).fit(train_x, train_y)
        mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=train_x.head(3),
            registered_model_name="bare",
            serialization_format="cloudpickle",
        )  # MLflow 2's default; skops needs trusted types
    return time.perf_counter() - started


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fork_server_pid(executor) -> int | None:
    path = str(executor.fork_server.socket_path)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if path in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    return int(entry)
            except OSError:
                continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from service import create_app
    from training.attempt import preload_training

    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    app = create_app({"MLFLOW_TRACKING_URI": uri, "STATE_DIR": str(folder / "state"), "API_TOKEN": TOKEN,
                      "WATCH_REGISTRY": False, "LOG_LEVEL": "WARNING"})  # fmt: skip
    client, executor = app.test_client(), app.extensions["train_executor"]
    executor.start_fork_server()
    while not executor.fork_server.is_up():
        time.sleep(0.2)
    preload_training()  # the bare script's side, warm too
    body = {"estimator": "LogisticRegression", "dataset": "iris", "activate": False}
    post_to_succeeded(client, body)  # the fork server opens this store once
    local = [post_to_succeeded(client, body) for _ in range(args.repeat)]
    waited = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        client.post("/train", json={**body, "wait": True}, headers=HEADERS)
        waited.append(time.perf_counter() - started)
    bare_mlflow(uri)
    bare = [bare_mlflow(uri) for _ in range(args.repeat)]
    started = time.perf_counter()
    locations = [client.post("/train", json={"estimator": e, "dataset": d, "activate": False}, headers=HEADERS)
                 .json["location"] for e, d in (SMALL * args.jobs)[: args.jobs]]  # fmt: skip
    for location in locations:
        while client.get(location, headers=HEADERS).json["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
    per_minute = args.jobs / (time.perf_counter() - started) * 60
    server = fork_server_pid(executor)
    one = local[-1][1]
    rows = [
        ("POST→succeeded, LR on iris, local executor (median)", f"{statistics.median(t for t, _ in local):.2f} s", "≤ 2.5 s"),
        ("waited /train, same job (median)", f"{statistics.median(waited):.2f} s", "≤ the line above + 0.3 s"),
        ("bare MLflow script, warm (median)", f"{statistics.median(bare):.2f} s", ""),
        ("local ÷ bare", f"{statistics.median(t for t, _ in local) / statistics.median(bare):.2f}x", "≤ 0.5x"),
        ("job's wait (created→started)", f"{one['waited_seconds']:.3f} s", "≤ 0.2 s"),
        ("job's phases (s)", ", ".join(f"{k} {v}" for k, v in one.get("phases", {}).items()), ""),
        (f"{args.jobs} small jobs, concurrency 1", f"{per_minute:.1f} jobs/min", "≥ 30"),
        ("fork server RSS", f"{rss_mib(server):.0f} MiB" if server else "?", ""),
    ]  # fmt: skip
    print("| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
