"""Postman users: the shipped collection passes under newman, and /openapi.json imported as is works."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import requests

from tests.conftest import ROOT
from tests.servers import Service

NODE_BIN = ROOT / "build" / "node" / "node_modules" / ".bin"
COLLECTION = ROOT / "postman" / "model-serving.postman_collection.json"
TOKEN = "postman-test-" + uuid.uuid4().hex


def node_tool(name: str) -> str:
    path = NODE_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make node-tools` installs newman and openapi-to-postmanv2 (make test does)")
    return str(path)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    folder = tmp_path_factory.mktemp("postman")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "API_TOKEN": TOKEN}
    service = Service(env, folder, workers=2).start()
    yield service
    service.stop()


def newman(collection, report, *variables: str) -> tuple[subprocess.CompletedProcess, dict]:
    args = [node_tool("newman"), "run", str(collection), "--color", "off", "--timeout-request", "300000",
            "-r", "cli,json", "--reporter-json-export", str(report)]  # fmt: skip
    for variable in variables:
        args += ["--env-var", variable]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    return run, json.loads(report.read_text())


def requests_in(items: list) -> int:
    return sum(requests_in(item["item"]) if "item" in item else 1 for item in items)


def test_shipped_collection_passes(service, tmp_path):
    run, report = newman(COLLECTION, tmp_path / "report.json", f"baseUrl={service.url}", f"token={TOKEN}")
    assert run.returncode == 0, run.stdout[-6000:]
    stats = report["run"]["stats"]
    assert stats["assertions"]["failed"] == 0 and stats["assertions"]["total"] > 60
    assert stats["requests"]["total"] == requests_in(json.loads(COLLECTION.read_text())["item"])
    assert not report["run"]["failures"]
    # It trained, swapped and predicted with the new model: visible in the service's own answers.
    models = requests.get(f"{service.url}/models", timeout=30).json()["models"]
    assert any(
        m["name"] == "postman-iris-LogisticRegression" and m["estimator"] == "LogisticRegression" for m in models
    )


@pytest.mark.parametrize("resolution", ["Schema", "Example"])  # Postman's two ways of building bodies on import
def test_openapi_document_imported_as_is(service, tmp_path, resolution):
    document = tmp_path / "openapi.json"
    document.write_text(requests.get(f"{service.url}/openapi.json", timeout=30).text)
    imported = tmp_path / "imported.json"
    convert = subprocess.run(
        [node_tool("openapi2postmanv2"), "-s", str(document), "-o", str(imported), "-p",
         "-O", f"parametersResolution={resolution}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert convert.returncode == 0, convert.stdout + convert.stderr
    collection = json.loads(imported.read_text())
    assert [(v["key"], v["value"]) for v in collection["variable"]] == [("baseUrl", service.url)]
    bodies = json.dumps([e.get("request", {}).get("body") for e in collection["item"]])
    assert "<number>" not in bodies and "<string>" not in bodies

    # No baseUrl given: the document's servers entry is enough. The token is the one Postman asks for.
    run, report = newman(imported, tmp_path / "report.json", f"bearerToken={TOKEN}")
    assert run.returncode == 0, run.stdout[-6000:]
    answers = {(e["request"]["method"], "/".join(e["item"]["request"]["url"]["path"])): e["response"]["code"]
               for e in report["run"]["executions"]}  # fmt: skip
    documented = json.loads(document.read_text())["paths"]
    assert len(answers) == sum(len(operations) for operations in documented.values())
    for (method, path), status in answers.items():
        if path == "train/jobs/:job_id":
            assert status == 404  # no job id to give: the importer fills in a placeholder
        elif path == "train":
            assert status == 202  # a job is started
        elif path.startswith("rollout") and method != "GET":
            # The example's candidate may exist or not (the job above may have registered it): whatever the
            # answer, it is one the document declares, and a rollout started here is ended by DELETE.
            declared = documented["/" + path][method.lower()]["responses"]
            assert str(status) in declared and status < 500, (method, path, status)
        else:
            assert status == 200, (method, path, status)
