"""Fixtures: one MLflow store per test session (bootstrapped once), apps built on it, real servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel.registry import ModelRef
from service import create_app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAME = "iris-RandomForestClassifier"
TOKEN = "test-api-token"  # every test app's API_TOKEN; `client` and `client_of` send it
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_collection_modifyitems(config, items):
    """SKIP_DRILLS=1 (a laptop, a quick local check) skips the slow drills; CI never sets it."""
    if os.environ.get("SKIP_DRILLS") != "1" or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="SKIP_DRILLS=1: slow drill skipped locally (CI runs it)")
    for item in items:
        if "drill" in item.keywords:
            item.add_marker(skip)


def mlflow_client(uri: str):
    """An MlflowClient on `uri` for both tracking and registry.

    `MlflowClient(uri)` alone takes its registry from the process-wide registry URI, which the first
    training job in this test process sets (`mlflow.set_registry_uri`) to its own store: later
    searches would then read another test's registry.
    """
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ref(model: dict) -> dict:
    """The name and version of an answer's `model` object (which also says the runtime serving it)."""
    return {"name": model["name"], "version": model["version"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict:
    """A local MLflow store with the default model bootstrapped (as `make run` does on first start)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    config = {"MLFLOW_TRACKING_URI": uri, "STATE_DIR": str(folder / "bootstrap-state"), "WATCH_REGISTRY": False,
              "API_TOKEN": TOKEN}  # fmt: skip
    app = create_app(config)
    registry = app.extensions["registry"]
    return {"uri": uri, "folder": folder, "registry": registry, "default": registry.get_active_model()}


@pytest.fixture
def app_config(store, tmp_path) -> dict:
    """The settings of a test's app: the shared store, with this test's own state folder."""
    return {"MLFLOW_TRACKING_URI": store["uri"], "STATE_DIR": str(tmp_path / "state"), "WATCH_REGISTRY": False,
            "API_TOKEN": TOKEN}  # fmt: skip


@pytest.fixture
def app(store, app_config):
    """An app serving the default model (re-activated, in case an earlier test swapped)."""
    store["registry"].set_active_model(store["default"])
    app = create_app(app_config)
    yield app
    app.extensions["model_store"].stop()


def client_of(app):
    """A test client that sends the API token with every request, as a user who ran `make token` does."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
    return client


@pytest.fixture
def client(app):
    return client_of(app)


@pytest.fixture(scope="session")
def wine_tree(store) -> ModelRef:
    """A second registered version (another dataset and estimator), not activated."""
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    spec = TrainingSpec("DecisionTreeClassifier", {"max_depth": 4}, activate=False)
    result = run_training(store["registry"], spec, load_builtin("wine"))
    return ModelRef(**result["model"])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` subprocess on a free loopback port (SQLite backend, served artifacts)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed after the server stops
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", (folder / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process=process)
        yield {"uri": f"http://127.0.0.1:{port}", "process": process, "folder": folder, "port": port}
    finally:
        stop(process)
        log.close()
