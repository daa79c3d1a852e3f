"""compose.yaml, the one-machine production stack: read here (it is not run on the project's machines: no
Docker engine), and checked by `docker compose config` or `podman-compose config` where either is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "compose.yaml"
ENV = {"API_TOKEN": "compose-check", "POSTGRES_PASSWORD": "compose-check", "PATH": "/usr/bin:/bin:/usr/local/bin"}


def test_the_stack_has_the_api_a_worker_redis_postgresql_and_mlflow():
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    assert set(services) == {"api", "worker", "redis", "postgres", "mlflow"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in ("api", "worker"):
        service = services[name]
        assert service["build"]["target"] in dockerfile and f"AS {service['build']['target']}" in dockerfile
        assert service["read_only"] is True and any(volume.endswith(":/data") for volume in service["volumes"])
        assert service["environment"]["TRAIN_EXECUTOR"] == "celery"
        assert service["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["worker"]["command"] == ["worker"]
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert "postgresql" in services["mlflow"]["command"]


@pytest.mark.parametrize("tool", ["docker compose", "podman-compose"])
def test_compose_tools_accept_it(tool):
    program = tool.split()[0]
    if shutil.which(program) is None or (
        tool == "docker compose" and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip(f"{tool} is not installed here")
    done = subprocess.run([*tool.split(), "-f", str(COMPOSE), "config"], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
