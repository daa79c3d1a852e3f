"""APP_ROLE: inference never trains (nor imports the training code); training does not serve predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from service import create_app
from tests.conftest import IRIS_ROW, ROOT, client_of, ref


def test_inference_role_has_no_training_and_serves_the_registry(store, tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        from service import create_app
        app = create_app({"WATCH_REGISTRY": False})
        client = app.test_client()
        print(json.dumps({
            "training_imported": any(name == "training" or name.startswith("training.") for name in sys.modules),
            "train": client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris"}).status_code,
            "jobs": client.get("/train/jobs/" + "0" * 32).status_code,
            "predict": client.post("/predict", json=ROW).get_json(),
            "paths": sorted(client.get("/openapi.json").get_json()["paths"]),
        }))
        """
    ).replace("ROW", json.dumps(IRIS_ROW))
    env = {**os.environ, "APP_ROLE": "inference", "MLFLOW_TRACKING_URI": store["uri"], "STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["training_imported"] is False
    assert result["train"] == 404
    assert result["jobs"] == 404
    assert ref(result["predict"]["model"]) == store["registry"].get_active_model().as_dict()
    assert "/train" not in result["paths"]


def test_sagemaker_routes(client):
    assert client.get("/ping").status_code == 200
    answer = client.post("/invocations", json={"instances": [IRIS_ROW]})
    assert answer.status_code == 200
    assert answer.json["predictions"] == ["setosa"]


def test_training_role_trains_but_does_not_serve(store, app_config):
    app = create_app({**app_config, "APP_ROLE": "training"})
    client = client_of(app)
    assert client.post("/predict", json=IRIS_ROW).status_code == 404
    assert client.post("/train", json={"estimator": "SVC", "dataset": "nope"}).status_code == 400
    assert client.get("/health").json["role"] == "training"
