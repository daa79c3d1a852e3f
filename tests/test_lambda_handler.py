"""Zappa's real handler from the package `make package` built, in-process, with API Gateway events.

The package is unpacked as Lambda does (/var/task) and `handler.lambda_handler` runs in a fresh
Python 3.12 interpreter (Lambda's runtime) that sees only the package and boto3, as the runtime
provides it. S3 is moto's server on loopback: it holds the project archive that the slim handler
downloads and unpacks at a cold start, and the remote_env file with the API token. The tracking
server is a real `mlflow server` with a model registered by `python -m training` (the batch job).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import IRIS_ROW, ROOT, ref
from tests.lambda_events import http_v2, rest_v1
from tests.servers import S3Server, mlflow_server_with

DIST = ROOT / "dist"
HANDLER_ZIP = DIST / "lambda-production-handler.zip"
PROJECT_TAR = DIST / "lambda-production-project.tar.gz"
LAMBDA_PYTHON = ROOT / ".venv-lambda" / "bin" / "python"
RUNTIME = ROOT / "build" / "lambda-runtime"
INVOKE = Path(__file__).with_name("lambda_invoke.py")
SETTINGS = json.loads((ROOT / "zappa_settings.json").read_text())["production"]
TOKEN = "s3cr3t-from-remote-env"
ACTIVE = {"name": "iris-RandomForestClassifier", "version": "1"}
EXTRACT_DIR = Path("/tmp") / SETTINGS["project_name"]  # fixed by Zappa's handler: /tmp/<project_name>


@pytest.fixture(scope="module")
def built_package():
    missing = [str(p) for p in (HANDLER_ZIP, PROJECT_TAR, LAMBDA_PYTHON, RUNTIME) if not p.exists()]
    if missing:
        message = f"the Lambda package is not built (make package needs Python 3.12; make test builds it): {missing}"
        if os.environ.get("REQUIRE_LAMBDA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return HANDLER_ZIP, PROJECT_TAR


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An `mlflow server` with one model registered and activated by the batch training job."""
    folder = tmp_path_factory.mktemp("lambda-mlflow")
    training = [
        "--estimator",
        "RandomForestClassifier",
        "--dataset",
        "iris",
        "--model-name",
        "iris-RandomForestClassifier",
    ]
    with mlflow_server_with(folder, [training]) as uri:
        yield uri


@pytest.fixture(scope="module")
def s3(tmp_path_factory, built_package, tracking_server):
    """moto's S3 with Zappa's bucket (the project archive) and the remote_env file."""
    import boto3

    server = S3Server(tmp_path_factory.mktemp("lambda-s3")).start()
    try:
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        bucket = SETTINGS["s3_bucket"]
        client.create_bucket(Bucket=bucket)
        client.upload_file(str(PROJECT_TAR), bucket, f"production_{SETTINGS['project_name']}_current_project.tar.gz")
        config_bucket, config_key = SETTINGS["remote_env"].removeprefix("s3://").split("/", 1)
        client.create_bucket(Bucket=config_bucket)
        client.put_object(Bucket=config_bucket, Key=config_key, Body=json.dumps({"API_TOKEN": TOKEN}))
        yield server.url
    finally:
        server.stop()


def lambda_env(tmp_path: Path, s3_url: str, tracking_uri: str) -> dict:
    """The environment Lambda gives the function: read-only code (no .pyc written), /tmp, its role's keys."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),  # the service's model cache (STATE_DIR) goes under the temp folder
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_LAMBDA_FUNCTION_NAME": "model-serving-production",
        "AWS_ENDPOINT_URL_S3": s3_url,  # botocore reads a service's endpoint from AWS_ENDPOINT_URL_<SERVICE>
        "MLFLOW_TRACKING_URI": tracking_uri,  # set as the function's environment (section 10 of the deploy doc)
    }


def run_handler(task_dir: Path, events: list[dict], env: dict) -> tuple[list[dict], float]:
    """All events through one fresh handler process; the answers and the seconds to the first one."""
    result = subprocess.run([str(LAMBDA_PYTHON), "-S", str(INVOKE), str(task_dir), str(RUNTIME)],
                            input=json.dumps(events), capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and len(lines) == len(events), result.stderr[-4000:]
    return [line["response"] for line in lines], lines[0]["seconds"]


@pytest.mark.parametrize("api", ["rest_v1", "http_v2"])
def test_handler_answers_api_gateway_events(api, built_package, s3, tracking_server, tmp_path):
    task = tmp_path / "var-task"
    with zipfile.ZipFile(HANDLER_ZIP) as archive:
        archive.extractall(task)
    settings = (task / "zappa_settings.py").read_text()
    assert "SLIM_HANDLER=True" in settings and "'APP_ROLE': 'inference'" in settings
    assert not (task / "serving").exists()  # the code comes from S3 at a cold start
    make, stage = (rest_v1, "production") if api == "rest_v1" else (http_v2, "$default")
    authorization = "Authorization" if api == "rest_v1" else "authorization"  # as each API Gateway sends it
    events = [
        make("POST", "/predict", stage=stage, body=IRIS_ROW),
        make("POST", "/predict", stage=stage, body={"sepal_length_cm": "wide"}),
        make("POST", "/predict", stage=stage, body="{not json"),
        make("GET", "/health", stage=stage),
        make("GET", "/ready", stage=stage),
        make("POST", "/train", stage=stage, body={"estimator": "GaussianNB", "dataset": "iris"}),
        make("POST", "/use-model", stage=stage, body=ACTIVE, headers={authorization: "Bearer not-the-token"}),
        make("POST", "/use-model", stage=stage, body=ACTIVE, headers={authorization: f"Bearer {TOKEN}"}),
    ]
    shutil.rmtree(EXTRACT_DIR, ignore_errors=True)  # a cold container has no /tmp/<project>
    try:
        answers, cold = run_handler(task, events, lambda_env(tmp_path, s3, tracking_server))
        for module in ("service/__init__.py", "serving/views.py", "kernel/model_format.py"):
            assert (EXTRACT_DIR / module).exists(), module
        assert not (EXTRACT_DIR / "training").exists()  # the package holds no training code
    finally:
        shutil.rmtree(EXTRACT_DIR, ignore_errors=True)
    predict, bad, malformed, health, ready, train, wrong_token, use_model = answers
    for answer in answers:
        assert answer["headers"]["Content-Type"].startswith("application/json"), answer
    assert predict["statusCode"] == 200, predict
    assert json.loads(predict["body"])["predictions"] == ["setosa"]
    assert bad["statusCode"] == 400
    bad_body = json.loads(bad["body"])
    assert bad_body["error"] == "invalid_input"
    assert set(bad_body["example"]) == set(IRIS_ROW)
    assert malformed["statusCode"] == 400
    assert json.loads(health["body"]) == {"status": "ok", "role": "inference",
                                         "prediction_log": {"status": "off", "reason": "PREDICTION_LOG=off"}}  # fmt: skip
    assert ref(json.loads(ready["body"])["model"]) == {"name": "iris-RandomForestClassifier", "version": "1"}
    assert train["statusCode"] == 404  # the inference role has no training endpoint
    # API_TOKEN arrived through remote_env from S3: that token is accepted, another is not. (Without it the
    # service would make up its own token, and refuse both.)
    assert wrong_token["statusCode"] == 401, wrong_token
    assert use_model["statusCode"] == 200, use_model
    assert ref(json.loads(use_model["body"])["model"]) == ACTIVE
    print(f"\ncold start ({api}): {cold:.2f} s from process start to the first /predict answer")
