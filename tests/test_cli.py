"""`python -m training`: the batch job registers a version, or says what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def run_cli(store, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_trains_and_registers(store):
    before = {(m["name"], m["version"]) for m in store["registry"].list_models()}
    done = run_cli(store, "--estimator", "KNeighborsClassifier", "--params", '{"n_neighbors": 5}', "--dataset", "wine",
                   "--model-name", "wine-knn-batch", "--no-activate")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"]["name"] == "wine-knn-batch"
    after = {(m["name"], m["version"]) for m in store["registry"].list_models()}
    assert after - before == {("wine-knn-batch", result["model"]["version"])}
    assert store["registry"].get_active_model() == store["default"]  # --no-activate


def test_cli_csv(store, tmp_path):
    import pandas as pd

    from tests.test_training import customer_rows

    path = tmp_path / "accounts.csv"
    pd.DataFrame(customer_rows(50)).to_csv(path, index=False)
    done = run_cli(
        store, "--estimator", "DecisionTreeClassifier", "--csv", str(path), "--target", "churned", "--no-activate"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["name"] == "accounts-DecisionTreeClassifier"


def test_cli_bad_request_exits_2_and_registers_nothing(store):
    before = len(store["registry"].search_model_versions())
    done = run_cli(store, "--estimator", "SVC", "--params", '{"C": "big"}', "--dataset", "iris")
    assert done.returncode == 2
    assert "C" in json.loads(done.stderr)["errors"]["params"]
    assert len(store["registry"].search_model_versions()) == before
