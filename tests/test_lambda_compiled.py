"""The compiled-only Lambda package (stage production_compiled) through Zappa's real handler, in-process.

`make package STAGE=production_compiled` builds one zip without slim_handler: the service with ONNX
Runtime and numpy, and no scikit-learn, scipy, pandas or skops. It is unpacked as Lambda does
(/var/task) and `handler.lambda_handler` runs in a fresh Python 3.12 interpreter that sees only the
zip and boto3 (the runtime's). S3 is moto's server on loopback (remote_env, the API token); the
tracking server is a real `mlflow server` with versions registered by `python -m training`: a
RandomForest (compiled, active) and a HistGradientBoosting (no compiled form: skl2onnx cannot convert it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import IRIS_ROW, ROOT
from tests.lambda_events import http_v2, rest_v1
from tests.servers import COMPILED, NOT_COMPILED, S3Server, compiled_and_not_compiled
from tests.test_lambda_handler import INVOKE, RUNTIME, TOKEN, lambda_env

STAGE = "production_compiled"
FUNCTION_ZIP = ROOT / "dist" / f"lambda-{STAGE}-handler.zip"
LAMBDA_PYTHON = ROOT / ".venv-lambda-compiled" / "bin" / "python"
SETTINGS = json.loads((ROOT / "zappa_settings.json").read_text())
REMOTE_ENV = {**SETTINGS["production"], **SETTINGS[STAGE]}["remote_env"]
WARM_REQUESTS = 20
ABSENT = ("sklearn", "scipy", "pandas", "skops", "matplotlib", "pyarrow", "training")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The function's zip unpacked as Lambda's /var/task (read-only there: no .pyc is written)."""
    missing = [str(p) for p in (FUNCTION_ZIP, LAMBDA_PYTHON, RUNTIME) if not p.exists()]
    if missing:
        message = (
            f"the compiled Lambda package is not built (make package STAGE={STAGE}; make test builds it): {missing}"
        )
        if os.environ.get("REQUIRE_LAMBDA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    task = tmp_path_factory.mktemp("var-task")
    with zipfile.ZipFile(FUNCTION_ZIP) as archive:
        archive.extractall(task)
    return task


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An `mlflow server`: a compiled version (active) and one without a compiled form, both from the batch job."""
    folder = tmp_path_factory.mktemp("lambda-compiled-mlflow")
    with compiled_and_not_compiled(folder) as uri:
        yield uri


@pytest.fixture(scope="module")
def s3(tmp_path_factory, task_dir):
    """moto's S3 with the remote_env file (no project archive: this stage is one zip)."""
    import boto3

    server = S3Server(tmp_path_factory.mktemp("lambda-compiled-s3")).start()
    try:
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
        bucket, key = REMOTE_ENV.removeprefix("s3://").split("/", 1)
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"API_TOKEN": TOKEN}))
        yield server.url
    finally:
        server.stop()


def run_handler(task: Path, events: list[dict], env: dict) -> tuple[list[dict], list[float]]:
    """All events through one fresh handler process; the answers and the seconds from its start to each."""
    env = {**env, "AWS_LAMBDA_FUNCTION_NAME": f"model-serving-{STAGE}"}
    result = subprocess.run([str(LAMBDA_PYTHON), "-S", str(INVOKE), str(task), str(RUNTIME)],
                            input=json.dumps(events), capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and len(lines) == len(events), result.stderr[-4000:]
    return [line["response"] for line in lines], [line["seconds"] for line in lines]


def set_active(uri: str, name: str) -> None:
    """Point the registry at a version, as /use-model or the training job would."""
    from kernel.config import load_settings
    from kernel.registry import ModelRef, registry_from_settings

    registry_from_settings(load_settings({"MLFLOW_TRACKING_URI": uri})).set_active_model(ModelRef(name, "1"))


def test_package_has_no_scikit_learn(task_dir):
    settings = (task_dir / "zappa_settings.py").read_text()
    assert "SLIM_HANDLER=True" not in settings and "'APP_ROLE': 'inference'" in settings
    # the root, inference and the kernel
    for module in ("service/__init__.py", "serving/views.py", "kernel/model_format.py"):
        assert (task_dir / module).exists(), module
    assert (task_dir / "onnxruntime").is_dir()
    assert [name for name in ABSENT if (task_dir / name).exists()] == []
    # Precompiled: Lambda's /var/task is read-only, so a module without its .pyc is compiled at every cold start.
    assert (task_dir / "serving" / "__pycache__" / "prediction.cpython-312.pyc").exists()


@pytest.mark.parametrize("api", ["rest_v1", "http_v2"])
def test_compiled_version_answers_api_gateway_events(api, task_dir, s3, tracking_server, tmp_path):
    set_active(tracking_server, COMPILED)
    make, stage = (rest_v1, STAGE) if api == "rest_v1" else (http_v2, "$default")
    use_other = {"name": NOT_COMPILED, "version": "1"}
    events = [
        make("POST", "/predict", stage=stage, body=IRIS_ROW),
        make("POST", "/predict", stage=stage, body={"records": [IRIS_ROW, {**IRIS_ROW, "petal_length_cm": 6.0}]}),
        make("POST", "/predict", stage=stage, body={"sepal_length_cm": "wide"}),
        make("GET", "/health", stage=stage),
        make("GET", "/ready", stage=stage),
        make("GET", "/drift", stage=stage),
        make("POST", "/use-model", stage=stage, body=use_other, headers={"authorization": f"Bearer {TOKEN}"}),
        make("POST", "/train", stage=stage, body={"estimator": "GaussianNB", "dataset": "iris"}),
    ]
    warm = [make("POST", "/predict", stage=stage, body=IRIS_ROW) for _ in range(WARM_REQUESTS)]
    answers, seconds = run_handler(task_dir, events + warm, lambda_env(tmp_path, s3, tracking_server))
    answers, warm_answers = answers[: len(events)], answers[len(events) :]
    assert [answer["statusCode"] for answer in warm_answers] == [200] * WARM_REQUESTS
    for answer in answers:
        assert answer["headers"]["Content-Type"].startswith("application/json"), answer
    predict, batch, bad, health, ready, drift, use_model, train = answers
    statuses = [answer["statusCode"] for answer in answers]
    assert statuses == [200, 200, 400, 200, 200, 200, 422, 404], answers
    body = json.loads(predict["body"])
    assert body["predictions"] == ["setosa"]
    assert body["model"] == {"name": COMPILED, "version": "1", "runtime": "onnx"}
    assert set(body["probabilities"][0]) == {"setosa", "versicolor", "virginica"}
    assert len(json.loads(batch["body"])["predictions"]) == 2
    assert json.loads(bad["body"])["error"] == "invalid_input"
    assert json.loads(health["body"]) == {"status": "ok", "role": "inference",
                                         "prediction_log": {"status": "off", "reason": "PREDICTION_LOG=off"}}  # fmt: skip
    assert json.loads(ready["body"])["model"]["runtime"] == "onnx"
    # Drift counts in this one process (numpy only: the package has no pandas or scipy); the 400 is not counted.
    drift = json.loads(drift["body"])
    assert drift["scope"] == "process" and [(m["name"], m["rows"]) for m in drift["models"]] == [(COMPILED, 3)]
    # A version without a compiled form cannot be served here; the compiled one keeps serving.
    refused = json.loads(use_model["body"])
    assert refused["error"] == "model_not_loadable"
    assert "no compiled form" in refused["message"] and "scikit-learn is not installed" in refused["message"]
    warm_ms = statistics.median(b - a for a, b in zip(seconds[len(events) - 1 :], seconds[len(events) :])) * 1000
    print(f"\ncompiled package ({api}): cold start {seconds[0]:.2f} s from process start to the first /predict "
          f"answer; warm one-row /predict {warm_ms:.1f} ms (median of {WARM_REQUESTS}, through the handler)")  # fmt: skip


def test_version_without_compiled_form_is_not_ready(task_dir, s3, tracking_server, tmp_path):
    set_active(tracking_server, NOT_COMPILED)
    try:
        events = [
            rest_v1("GET", "/health", stage=STAGE),
            rest_v1("GET", "/ready", stage=STAGE),
            rest_v1("POST", "/predict", stage=STAGE, body=IRIS_ROW),
        ]
        (health, ready, predict), _ = run_handler(task_dir, events, lambda_env(tmp_path, s3, tracking_server))
    finally:
        set_active(tracking_server, COMPILED)
    assert health["statusCode"] == 200
    for answer in (ready, predict):
        assert answer["statusCode"] == 503, answer
        body = json.loads(answer["body"])
        assert body["error"] == "not_ready"
        assert f"{NOT_COMPILED} version 1" in body["message"]
        assert "no compiled form" in body["message"] and "scikit-learn is not installed" in body["message"]
        assert "could not be converted to ONNX" in body["message"]  # the reason recorded at registration


def test_a_canary_and_an_inline_shadow_on_the_compiled_handler(task_dir, s3, tracking_server, tmp_path):
    """One Lambda environment: a sticky canary splits by key with each answer from its arm's version; a shadow
    answers as the stable version and scores within the request (SHADOW_INLINE_SAMPLE=1 here), counted at once."""
    set_active(tracking_server, COMPILED)
    auth = {"authorization": f"Bearer {TOKEN}"}
    candidate = {"name": COMPILED, "version": "2"}
    canary = {"candidate": candidate, "mode": "canary", "steps": [50], "sticky": {"header": "X-User-Id"}}
    keyed = [rest_v1("POST", "/predict", stage=STAGE, body=IRIS_ROW, headers={"X-User-Id": f"user-{i}"})
             for i in range(40)]  # fmt: skip
    shadow = {"candidate": candidate, "mode": "shadow", "shadow_percent": 100}
    events = [
        rest_v1("POST", "/rollout", stage=STAGE, body=canary, headers=auth),
        *keyed,
        rest_v1("GET", "/rollout", stage=STAGE, headers=auth),
        rest_v1("DELETE", "/rollout", stage=STAGE, headers=auth),
        rest_v1("POST", "/rollout", stage=STAGE, body=shadow, headers=auth),
        *[rest_v1("POST", "/predict", stage=STAGE, body=IRIS_ROW) for _ in range(30)],
        rest_v1("GET", "/rollout", stage=STAGE, headers=auth),
        rest_v1("DELETE", "/rollout", stage=STAGE, headers=auth),
    ]
    env = {**lambda_env(tmp_path, s3, tracking_server), "SHADOW_INLINE_SAMPLE": "1"}
    answers, _ = run_handler(task_dir, events, env)
    started, routed, counted, ended = answers[0], answers[1:41], answers[41], answers[42]
    assert started["statusCode"] == 201 and ended["statusCode"] == 200, (started, ended)
    routes = [answer["headers"]["X-Model-Route"] for answer in routed]
    assert set(routes) == {"stable", "candidate"}, routes
    for route, answer in zip(routes, routed, strict=True):
        assert answer["statusCode"] == 200
        assert json.loads(answer["body"])["model"]["version"] == {"stable": "1", "candidate": "2"}[route]
    arms = json.loads(counted["body"])["arms"]
    assert (arms["candidate"]["requests"], arms["stable"]["requests"]) == (routes.count("candidate"),
                                                                          routes.count("stable"))  # fmt: skip
    shadow_started, shadowed, shadow_counted, shadow_ended = answers[43], answers[44:74], answers[74], answers[75]
    assert shadow_started["statusCode"] == 201 and shadow_ended["statusCode"] == 200
    served = {(a["statusCode"], a["headers"]["X-Model-Route"], a["headers"]["X-Model-Version"]) for a in shadowed}
    assert served == {(200, "stable", "1")}, served
    state = json.loads(shadow_counted["body"])
    assert state["arms"]["shadow"]["requests"] == 30 and state["shadow"]["rows"] == 30, state
    assert state["shadow"]["agreement"] == 1.0  # both versions call IRIS_ROW setosa
