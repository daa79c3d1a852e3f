"""The servers `make bench` starts: this service, `mlflow models serve`, MLServer and the floor (a bare Flask
handler), and which of their processes are its workers.

Part of scripts/bench_serving.py (`make bench`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.bench_processes import (
    BIN,
    ROOT,
    Processes,
    children,
    command_line,
    descendants,
    free_port,
    package_version,
)

TOKEN = "bench-token"
WORKERS = 2
MLSERVER_VERSION = "1.7.1"
MLSERVER_VENV = ROOT / "build" / "bench" / "mlserver-venv"


# ---- the servers -------------------------------------------------------------------------------------------
def start_ours(processes: Processes, folder: Path, tracking_uri: str, label: str, port: int, log):
    env = {
        **os.environ,
        "WEB_CONCURRENCY": str(WORKERS),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "STATE_DIR": str(folder / f"state-{label}"),  # empty: the version is downloaded as on a new machine
        "API_TOKEN": TOKEN,
        "BOOTSTRAP_DEFAULT_MODEL": "false",
        "TRAIN_WARM_START": "false",  # serving only: no warm parent of jobs training a warm-up model meanwhile
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.mkdtemp(prefix="prometheus-", dir=folder))),
    }
    command = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "wsgi:app"]
    return processes.start(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_theirs(processes: Processes, folder: Path, tracking_uri: str, model_uri: str, port: int, log):
    # It runs `uvicorn` by name: the venv's bin on PATH, as in an activated venv.
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    command = [
        str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-w", str(WORKERS), "-p", str(port), "-h", "127.0.0.1",
    ]  # fmt: skip
    return processes.start(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def our_workers(master: int) -> list[int]:
    """gunicorn's workers: the master's children."""
    return children(master)


def their_workers(leader: int) -> list[int]:
    """uvicorn's worker processes under `mlflow models serve` (spawned by multiprocessing)."""
    return [pid for pid in descendants(leader) if "spawn_main" in command_line(pid)]


def all_below(leader: int) -> list[int]:
    """MLServer's processes: its parallel inference workers and whatever else it started."""
    return descendants(leader)


def start_bare_flask(processes: Processes, folder: Path, port: int, log):
    """The bare Flask handler under the service's gunicorn.conf.py (same workers, threads, keep-alive, preload)."""
    env = {
        **os.environ,
        "WEB_CONCURRENCY": str(WORKERS),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tempfile.mkdtemp(prefix="prometheus-", dir=folder))),
    }
    command = [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "scripts.bench_bare_flask:app"]
    return processes.start(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def ensure_mlserver() -> Path:
    """MLServer's venv, made on first use: returns its bin folder. Its scikit-learn and array libraries are
    this venv's versions, so that it unpickles the same fitted pipeline and computes the same numbers."""
    pins = [f"{name}=={package_version(name)}" for name in ("scikit-learn", "numpy", "pandas", "scipy")]
    requirements = [f"mlserver=={MLSERVER_VERSION}", f"mlserver-sklearn=={MLSERVER_VERSION}", "uvloop<0.22", *pins]
    stamp = MLSERVER_VENV / (".installed-" + "-".join(sorted(requirements)).replace("<", "lt").replace("=", ""))
    if not stamp.exists():
        print(f"[bench] installing MLServer {MLSERVER_VERSION} into {MLSERVER_VENV} (once)", flush=True)
        if not (MLSERVER_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
                       check=True)  # fmt: skip
        stamp.touch()
    return MLSERVER_VENV / "bin"


def export_for_mlserver(model_uri: str, folder: Path) -> Path:
    """The registered version as MLServer's scikit-learn runtime loads it: a joblib file and its model settings."""
    import joblib
    import mlflow.sklearn

    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(mlflow.sklearn.load_model(model_uri), folder / "model.joblib")
    settings = {
        "name": "iris",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings))
    return folder


def start_mlserver(processes: Processes, mlserver_bin: Path, model_folder: Path, port: int, log):
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": WORKERS}  # fmt: skip
    (model_folder / "settings.json").write_text(json.dumps(settings))
    path = os.pathsep.join([str(mlserver_bin), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    return processes.start([str(mlserver_bin / "mlserver"), "start", str(model_folder)], cwd=model_folder, env=env,
                           stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def v2_body(row: dict, same_output: bool) -> bytes:
    """MLServer's V2 inference request for one row: one input per column, decoded as a DataFrame."""
    body = {
        "inputs": [{"name": name, "shape": [1], "datatype": "FP64", "data": [value]} for name, value in row.items()],
        "parameters": {"content_type": "pd"},
    }
    if same_output:
        body["outputs"] = [{"name": "predict"}, {"name": "predict_proba"}]
    return json.dumps(body).encode()


def v2_labels(answer: dict) -> list:
    return next(output["data"] for output in answer.get("outputs", []) if output["name"] == "predict")
