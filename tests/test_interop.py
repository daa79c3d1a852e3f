"""Every registered version is a standard MLflow model: pyfunc gives the labels /predict gives."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
import pytest

from training.datasets import load_builtin


@pytest.fixture(autouse=True)
def allow_mlflow_loader(monkeypatch):
    # MLflow's own loader refuses any deserialisation unless told the source is trusted (ours is).
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")


@pytest.mark.parametrize("which", ["default", "wine_tree"])
def test_pyfunc_predicts_what_the_service_predicts(client, store, wine_tree, which):
    ref = store["default"] if which == "default" else wine_tree
    dataset = load_builtin("iris" if which == "default" else "wine")
    rows = dataset.features.sample(40, random_state=0)
    used = client.post("/use-model", json=ref.as_dict())
    assert used.status_code == 200, used.json
    assert used.json["model"]["name"] == ref.name and used.json["model"]["version"] == ref.version
    served = client.post("/predict", json={"records": rows.to_dict(orient="records")})
    assert served.status_code == 200
    mlflow.set_registry_uri(store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{ref.name}/{ref.version}")
    expected = model.predict(rows)
    assert list(expected) == served.json["predictions"]
    assert set(expected) <= set(dataset.labels)  # real class names, not 0/1/2
    # The signature names the features /predict takes.
    assert model.metadata.get_input_schema().input_names() == list(rows.columns)


def test_mlflow_scoring_body_from_the_model_is_accepted(client, store):
    """The serving_input_example.json MLflow wrote for the model is a body /predict takes."""
    import json
    from pathlib import Path

    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(
        f"models:/{store['default'].name}/{store['default'].version}",
        registry_uri=store["uri"],
        tracking_uri=store["uri"],
    )
    body = json.loads((Path(path) / "serving_input_example.json").read_text())
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert len(response.json["predictions"]) == len(pd.DataFrame(**body["dataframe_split"]))
