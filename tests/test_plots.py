"""Every training run logs its plots: confusion matrix, ROC curve(s), feature importances."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import mlflow_client
from training.datasets import load_builtin
from training.run import run_training
from training.spec import TrainingSpec

ALL_PLOTS = {"confusion_matrix.png", "roc_curve.png", "feature_importances.png"}


@pytest.mark.parametrize(
    ("estimator", "params", "dataset"),
    [
        ("RandomForestClassifier", {"n_estimators": 20}, "breast_cancer"),  # binary, impurity importances
        ("LogisticRegression", {}, "iris"),  # three classes (one-vs-rest ROC), permutation importances
        ("SVC", {}, "wine"),  # no predict_proba: ROC from decision values
    ],
)
def test_every_run_logs_its_plots(store, estimator, params, dataset, tmp_path):
    spec = TrainingSpec(estimator, params, model_name=f"plots-{estimator}", activate=False)
    result = run_training(store["registry"], spec, load_builtin(dataset))
    client = mlflow_client(store["uri"])
    names = {artifact.path for artifact in client.list_artifacts(result["run_id"])}
    assert ALL_PLOTS <= names
    for name in ALL_PLOTS:
        path = client.download_artifacts(result["run_id"], name, str(tmp_path))
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200
