"""The container images, built (`make image`) and run as users run them (tests/images.py says how).

Both images are built once for the module. The inference image serves a compiled version from an
`mlflow server` (gunicorn on a free port; then `serve`, SageMaker's /ping and /invocations on 8080); the
full image runs the `train` job mode against the same server, and its Celery `worker` runs one job
from a Redis of this module's own. Where neither a Docker engine nor buildah is here the tests skip;
CI sets REQUIRE_IMAGE=1, which makes that a failure.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from tests import images
from tests.conftest import IRIS_ROW, free_port, mlflow_client
from tests.servers import COMPILED, NOT_COMPILED, compiled_and_not_compiled

pytestmark = pytest.mark.drill

TOKEN = "image-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOT_IN_INFERENCE = ("sklearn", "scipy", "pandas", "skops", "skl2onnx", "matplotlib", "training")


@pytest.fixture(scope="module")
def tool() -> str:
    return images.require_builder()


@pytest.fixture(scope="module")
def built(tool) -> dict:
    """Both images, built with the project's own command (a warm rebuild takes seconds: build/ keeps the wheels)."""
    seconds = images.build(tool)
    print(f"\nimages built with {tool} in {seconds}")
    return seconds


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """An `mlflow server`: a compiled version (active) and one without a compiled form (skl2onnx cannot convert it)."""
    folder = tmp_path_factory.mktemp("image-mlflow")
    with compiled_and_not_compiled(folder) as uri:
        yield uri


@pytest.fixture
def container(request, tool, built, tmp_path):
    """A container of the image named by the test's parameter, removed after the test."""
    made = []

    def make(target: str) -> images.Container:
        made.append(images.Container(tool, target, tmp_path / f"data-{target}"))
        return made[-1]

    yield make
    for each in made:
        each.remove()


def wait_until(url: str, process, log, timeout: float = 120, status: int = 200) -> float:
    """Seconds until GET `url` answers `status`; fails with the log's end if the process exits first."""
    started = time.monotonic()
    while True:
        assert process.poll() is None, (
            f"the container's process exited ({process.returncode}):\n{log.read_text()[-4000:]}"
        )
        try:
            if requests.get(url, timeout=2).status_code == status:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        assert time.monotonic() - started < timeout, f"{url} never answered {status}:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def first_prediction(url: str, process, log, timeout: float = 120) -> tuple[float, dict]:
    """Seconds until POST /predict answers 200, and the answer."""
    started = time.monotonic()
    while True:
        assert process.poll() is None, (
            f"the container's process exited ({process.returncode}):\n{log.read_text()[-4000:]}"
        )
        try:
            answer = requests.post(f"{url}/predict", json=IRIS_ROW, timeout=5)
            if answer.status_code == 200:
                return time.monotonic() - started, answer.json()
        except requests.RequestException:
            pass
        assert time.monotonic() - started < timeout, f"no prediction within {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def test_images_run_as_a_user_and_hold_no_tests_caches_or_git(tool, built, container):
    for target in ("inference", "full"):
        image = container(target)
        assert image.config["User"] == "app" and image.config["Entrypoint"] == ["/app/docker/entrypoint.sh"]
        assert "/data" in (image.config.get("Volumes") or {}) and {"8000/tcp", "8080/tcp"} <= set(
            image.config["ExposedPorts"]
        )
        paths = image.files()
        # What the project puts in: its code, the virtualenv, the state folder (the base image's own files aside).
        ours = [p for p in paths if p.startswith(("app/", "opt/", "data/", "root/", "tmp/"))]
        parts = [set(path.split("/")) for path in ours]
        assert [
            p for p, s in zip(ours, parts) if s & {".git", "tests", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
        ] == []
        assert [p for p in ours if p.startswith(("root/.cache", "data/home/.cache", "tmp/")) or "/pip/_vendor" in p
                or p.rsplit("/", 1)[-1].startswith("conftest") or p.startswith("app/test")] == []  # fmt: skip
        assert {"app/service/__init__.py", "app/kernel/logs.py", "app/serving/views.py", "app/wsgi.py"} <= set(paths)
        # The project's code arrives compiled: a read-only root cannot take .pyc files at start.
        assert "app/serving/__pycache__/prediction.cpython-311.pyc" in paths
        site = next(p for p in paths if p.endswith("site-packages") and p.startswith("opt/venv/"))
        installed = {p.split("/")[len(site.split("/"))] for p in paths if p.startswith(site + "/")}
        if target == "inference":
            assert {"onnxruntime", "numpy", "gunicorn", "mlflow", "boto3"} <= installed
            assert [m for m in NOT_IN_INFERENCE if m in installed or f"app/{m}" in paths] == []
        else:
            # psycopg2: the prediction log on PostgreSQL (PREDICTION_LOG_URL=postgresql+psycopg2://...)
            assert {"sklearn", "scipy", "pandas", "skl2onnx", "celery", "onnxruntime", "psycopg2"} <= installed
            assert "app/training/__main__.py" in paths
        size = images.size_bytes(tool, target)
        print(f"{target}: {size / 1e6:.0f} MB uncompressed")
        if target == "inference":
            assert size < 350e6, f"the inference image is {size / 1e6:.0f} MB; the budget is 350 MB"


def test_inference_image_serves_a_compiled_version_and_sagemakers_contract(tool, container, tracking, tmp_path):
    mlflow_client(tracking).set_registered_model_alias(COMPILED, "active", "1")
    image = container("inference")
    env = {"MLFLOW_TRACKING_URI": tracking, "API_TOKEN": TOKEN, "HOST": "127.0.0.1", "WEB_CONCURRENCY": "2"}
    port, log = free_port(), tmp_path / "inference.log"
    marker = time.time()
    time.sleep(0.01)
    started = time.monotonic()
    process = image.start([], {**env, "PORT": str(port)}, log)
    url = f"http://127.0.0.1:{port}"
    seconds, answer = first_prediction(url, process, log)
    print(f"\ninference image: entrypoint start to first prediction {time.monotonic() - started:.2f} s")
    assert answer["predictions"] == ["setosa"] and answer["model"] == {
        "name": COMPILED,
        "version": "1",
        "runtime": "onnx",
    }
    health = requests.get(f"{url}/health", timeout=10)
    assert health.json() == {
        "status": "ok",
        "role": "inference",
        "prediction_log": {"status": "off", "reason": "PREDICTION_LOG=off"},
    }
    ready = requests.get(f"{url}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["model"]["runtime"] == "onnx"
    # A version without a compiled form cannot be served by this image: refused with the reason; the active one stays.
    refused = requests.post(f"{url}/use-model", json={"name": NOT_COMPILED, "version": "1"}, headers=AUTH, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"] == "model_not_loadable", refused.text
    assert "no compiled form" in refused.json()["message"]
    assert requests.post(f"{url}/train", json={"estimator": "GaussianNB"}, headers=AUTH, timeout=10).status_code == 404
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all("level" in line for line in lines)  # JSON lines in a container (no terminal)
    images.Container.stop(process)
    if tool == "buildah":
        # Nothing was written outside the /data volume: the root filesystem can be read-only.
        written = [p for p in image.changed_since(marker) if p not in ("etc/hosts", "etc/resolv.conf", "etc/hostname")]
        assert written == []
    # Everything it wrote is in the volume: the state folder and the temp folder (gunicorn's and Prometheus's files).
    assert {"state", "tmp", "home"} <= {path.name for path in image.data.iterdir()}

    # SageMaker: `serve` listens on 8080 (SAGEMAKER_BIND_TO_PORT where 8080 is taken on this machine).
    env = {"MLFLOW_TRACKING_URI": tracking, "API_TOKEN": TOKEN, "WEB_CONCURRENCY": "1"}
    with socket.socket() as probe:
        taken = probe.connect_ex(("127.0.0.1", 8080)) == 0
    sagemaker_port = free_port() if taken else 8080
    if taken:
        env["SAGEMAKER_BIND_TO_PORT"] = str(sagemaker_port)
    log = tmp_path / "serve.log"
    process = image.start(["serve"], env, log)
    url = f"http://127.0.0.1:{sagemaker_port}"
    wait_until(f"{url}/ping", process, log)
    # CSV bodies need pandas, which this image has not: a 415 that says to send JSON (as the compiled Lambda stage).
    csv = requests.post(
        f"{url}/invocations", data="5.1,3.5,1.4,0.2\n", headers={"Content-Type": "text/csv"}, timeout=30
    )
    assert csv.status_code == 415 and "JSON" in csv.json()["message"], csv.text
    records = requests.post(f"{url}/invocations", json={"dataframe_records": [IRIS_ROW]}, timeout=30)
    assert records.status_code == 200 and "setosa" in json.dumps(records.json()), records.text
    images.Container.stop(process)


def test_full_image_trains_a_version_in_job_mode(container, tracking, tmp_path):
    image = container("full")
    done = image.run(["train", "--estimator", "GaussianNB", "--dataset", "wine", "--model-name", "wine-from-image",
                      "--no-activate"], {"MLFLOW_TRACKING_URI": tracking})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["model"]["name"] == "wine-from-image"
    from service import create_app

    app = create_app({"MLFLOW_TRACKING_URI": tracking, "STATE_DIR": str(tmp_path / "state"), "APP_ROLE": "inference",
                      "WATCH_REGISTRY": False, "START_MODEL_STORE": False, "API_TOKEN": TOKEN})  # fmt: skip
    models = app.test_client().get("/models").json["models"]
    assert {"name": "wine-from-image", "version": result["model"]["version"]} in [
        {"name": m["name"], "version": m["version"]} for m in models
    ]


def test_full_image_worker_runs_a_job_from_redis(container, tracking, tmp_path):
    from tests.celery_helpers import RedisServer, require_redis

    redis = RedisServer(require_redis(), tmp_path).start()
    try:
        env = {"MLFLOW_TRACKING_URI": tracking, "TRAIN_EXECUTOR": "celery", "CELERY_BROKER_URL": redis.url,
               "API_TOKEN": TOKEN, "TRAIN_TIME_LIMIT_SECONDS": "120"}  # fmt: skip
        image = container("full")
        log = tmp_path / "worker.log"
        worker = image.start(["worker"], env, log)
        from service import create_app

        app = create_app(
            {**env, "STATE_DIR": str(tmp_path / "api-state"), "APP_ROLE": "training", "WATCH_REGISTRY": False}
        )
        client = app.test_client()
        submitted = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris", "model_name": "iris-from-worker",
                                                "activate": False}, headers=AUTH)  # fmt: skip
        assert submitted.status_code == 202, submitted.json
        deadline = time.monotonic() + 180
        while (job := client.get(submitted.json["location"], headers=AUTH).json)["status"] not in (
            "succeeded",
            "failed",
        ):
            assert worker.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"{job}\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        assert job["status"] == "succeeded", f"{job}\n{log.read_text()[-4000:]}"
        assert job["result"]["model"]["name"] == "iris-from-worker"
    finally:
        redis.stop()
