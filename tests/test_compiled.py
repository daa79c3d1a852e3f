"""Compiled inference: each version's ONNX form agrees with scikit-learn, or says why it has none."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime
import pandas as pd
import pytest

from kernel.model_format import label_indices
from serving.loaded_model import load_model_dir
from tests.conftest import ROOT
from training.compile import compile_pipeline, feeds_from_frame
from training.datasets import from_frame, load_builtin
from training.estimators import ESTIMATORS
from training.pipeline import build_pipeline, split

# Small ensembles keep the 45 fits of this table quick; the conversion is the same at any size.
PARAMS = {
    "RandomForestClassifier": {"n_estimators": 15},
    "ExtraTreesClassifier": {"n_estimators": 15},
    "GradientBoostingClassifier": {"n_estimators": 15},
    "HistGradientBoostingClassifier": {"max_iter": 15},
}
# The README's estimators ("Estimators: ..." under Training, and "What compiles today" under Compiled
# inference). Pinned here against ESTIMATORS, so the table below can never shrink quietly.
DOCUMENTED = {
    "RandomForestClassifier",
    "ExtraTreesClassifier",
    "GradientBoostingClassifier",
    "HistGradientBoostingClassifier",
    "LogisticRegression",
    "SVC",
    "KNeighborsClassifier",
    "DecisionTreeClassifier",
    "GaussianNB",
}
# The one documented exception among estimators: the README says it does not compile, and why.
DOES_NOT_COMPILE = "HistGradientBoostingClassifier"
HGB_REASON = "HistGradientBoostingClassifier could not be converted to ONNX"


def customers(missing_text: bool):
    """Text and numbers with gaps, like a CRM export (the README's churn example has this shape)."""
    rng = np.random.default_rng(7)
    n = 240
    frame = pd.DataFrame(
        {
            "plan": rng.choice(["basic", "pro", "team"], n).astype(object),
            "region": rng.choice(["eu", "us", "apac"], n).astype(object),
            "monthly_spend": rng.normal(50, 20, n).round(2),
            "seats": rng.integers(1, 20, n),
        }
    )
    frame.loc[rng.choice(n, 25, replace=False), "monthly_spend"] = np.nan
    if missing_text:
        frame.loc[rng.choice(n, 20, replace=False), "region"] = None
    frame["churned"] = np.where((frame.plan == "basic") & (frame.seats < 8), "yes", "no")
    return from_frame(frame, "churned", "customers", "inline", {"max_rows": 10_000, "max_columns": 100})


DATASETS = {
    "iris": lambda: load_builtin("iris"),
    "wine": lambda: load_builtin("wine"),
    "breast_cancer": lambda: load_builtin("breast_cancer"),
    "digits": lambda: load_builtin("digits"),
    "text_and_missing": lambda: customers(missing_text=True),
}


@pytest.fixture(scope="module")
def datasets():
    return {name: make() for name, make in DATASETS.items()}


def test_the_documented_estimators_are_the_ones_served():
    assert set(ESTIMATORS) == DOCUMENTED
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"^Estimators: (.+?)\. Each", readme, re.MULTILINE | re.DOTALL)
    assert listed, "the README's list of estimators ('Estimators: ...') was not found"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == DOCUMENTED
    compiles = re.search(r"What compiles today .*?\): (.+?)\.\s+(\w+) does not", readme, re.DOTALL)
    assert compiles, "the README's 'What compiles today' sentence was not found"
    short = {re.sub(r"\s*\(.*\)", "", name).strip() for name in compiles.group(1).split(",")}
    named = {name for name in DOCUMENTED for prefix in short if name in (prefix, prefix + "Classifier")}
    assert named == DOCUMENTED - {DOES_NOT_COMPILE} and len(short) == len(named), short
    assert compiles.group(2) + "Classifier" == DOES_NOT_COMPILE


@pytest.mark.parametrize("dataset_name", DATASETS)
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_compiled_form_agrees_with_scikit_learn(datasets, estimator, dataset_name):
    """Every estimator the README lists compiles on every dataset here, except HistGradientBoosting."""
    dataset = datasets[dataset_name]
    train_x, test_x, train_y, _ = split(dataset.features, dataset.labels)
    pipeline = build_pipeline(dataset.features, estimator, PARAMS.get(estimator, {}))
    pipeline.fit(train_x, train_y)
    compiled = compile_pipeline(pipeline, train_x, test_x)
    if estimator == DOES_NOT_COMPILE:
        assert compiled.runtime == "sklearn" and compiled.onnx is None
        assert compiled.reason.startswith(HGB_REASON), compiled.reason
        return
    assert compiled.runtime == "onnx", f"{estimator} on {dataset_name} did not compile: {compiled.reason}"
    assert compiled.reason == f"verified on {len(test_x)} hold-out and {len(train_x)} training rows"
    # Checked here again, independently of compile_pipeline's own verdict.
    session = onnxruntime.InferenceSession(compiled.onnx, providers=["CPUExecutionProvider"])
    for rows in (test_x, train_x):
        _, probabilities = session.run(None, feeds_from_frame(rows))
        expected = pipeline.predict_proba(rows)
        classes = np.asarray(pipeline.classes_)
        assert (classes[label_indices(probabilities, compiled=True)] == pipeline.predict(rows)).all()
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_histgradientboosting_reason_names_the_estimator(datasets):
    dataset = datasets["iris"]
    train_x, test_x, train_y, _ = split(dataset.features, dataset.labels)
    pipeline = build_pipeline(dataset.features, "HistGradientBoostingClassifier", {"max_iter": 5})
    pipeline.fit(train_x, train_y)
    compiled = compile_pipeline(pipeline, train_x, test_x)
    assert compiled.runtime == "sklearn" and compiled.onnx is None
    assert compiled.reason.startswith(HGB_REASON), compiled.reason


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_text_with_empty_string_values_stays_with_sklearn(estimator):
    frame = pd.DataFrame({"plan": ["", "pro"] * 20, "spend": np.arange(40.0), "label": ["a", "b"] * 20})
    dataset = from_frame(frame, "label", "empty", "inline", {"max_rows": 100, "max_columns": 10})
    train_x, test_x, train_y, _ = split(dataset.features, dataset.labels)
    pipeline = build_pipeline(dataset.features, estimator, PARAMS.get(estimator, {})).fit(train_x, train_y)
    compiled = compile_pipeline(pipeline, train_x, test_x)
    assert compiled.runtime == "sklearn" and compiled.onnx is None
    assert compiled.reason == "the text columns ['plan'] hold \"\" as a value; ONNX would read it as missing"


@pytest.fixture(scope="module")
def mixed_versions(store):
    """Versions trained by the real job: a compiled one with text and gaps, and one that cannot compile."""
    from training.run import run_training
    from training.spec import TrainingSpec

    registry = store["registry"]
    made = {}
    for key, spec, dataset in [
        ("text", TrainingSpec("LogisticRegression", {}, "churn-lr", activate=False), customers(missing_text=True)),
        ("hgb", TrainingSpec("HistGradientBoostingClassifier", {"max_iter": 5}, "iris-hgb", activate=False),
         load_builtin("iris")),
    ]:  # fmt: skip
        made[key] = run_training(registry, spec, dataset)["model"]
    return made


def test_models_list_says_runtime_and_reason(client, mixed_versions):
    entries = {(m["name"], m["version"]): m for m in client.get("/models").json["models"]}
    text = entries[(mixed_versions["text"]["name"], mixed_versions["text"]["version"])]
    assert text["runtime"] == "onnx" and "verified" in text["runtime_reason"]
    hgb = entries[(mixed_versions["hgb"]["name"], mixed_versions["hgb"]["version"])]
    assert hgb["runtime"] == "sklearn" and hgb["runtime_reason"].startswith(HGB_REASON), hgb


def _use(client, model):
    response = client.post("/use-model", json=model)  # the client fixture sends the test token
    assert response.status_code == 200, response.json
    return response.json


def test_text_and_missing_values_served_by_onnx_match_sklearn(client, app, mixed_versions):
    answer = _use(client, mixed_versions["text"])
    assert answer["model"]["runtime"] == "onnx"
    rows = [
        {"plan": "basic", "region": "eu", "monthly_spend": 40.0, "seats": 3},
        {"plan": "team", "region": None, "monthly_spend": None, "seats": 12},
        {"plan": "unseen-plan", "region": "mars", "monthly_spend": 10.5, "seats": 1},
    ]
    served = client.post("/predict", json={"records": rows}).json
    assert served["model"]["runtime"] == "onnx"
    estimator = app.extensions["model_store"].get().estimator
    frame = pd.DataFrame(rows).astype({"monthly_spend": "float64", "seats": "float64"})
    frame["region"] = frame["region"].map(lambda v: np.nan if v is None else v).astype(object)
    expected = estimator.predict_proba(frame)
    assert served["predictions"] == estimator.predict(frame).tolist()
    got = np.array([[p[str(c)] for c in estimator.classes_] for p in served["probabilities"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_version_without_compiled_form_is_served_by_sklearn(client, app, mixed_versions):
    answer = _use(client, mixed_versions["hgb"])
    assert answer["model"]["runtime"] == "sklearn"
    model = app.extensions["model_store"].get()
    assert model.runtime == "sklearn" and model.runtime_reason.startswith(HGB_REASON), model.runtime_reason
    rows = load_builtin("iris").features.sample(40, random_state=3)
    served = client.post("/predict", json={"records": rows.to_dict("records")}).json
    assert served["model"] == {**mixed_versions["hgb"], "runtime": "sklearn"}
    # The estimator's own answers, on the same rows.
    assert served["predictions"] == model.estimator.predict(rows).tolist()
    got = np.array([[p[str(c)] for c in model.estimator.classes_] for p in served["probabilities"]])
    np.testing.assert_allclose(got, model.estimator.predict_proba(rows), atol=1e-12)


def test_serving_runtime_sklearn_forces_scikit_learn_with_same_labels(store, app_config, client):
    from service import create_app

    forced = create_app({**app_config, "SERVING_RUNTIME": "sklearn", "STATE_DIR": app_config["STATE_DIR"] + "-sk"})
    try:
        rows = load_builtin("iris").features.sample(40, random_state=1).to_dict("records")
        ours = client.post("/predict", json={"records": rows}).json
        theirs = forced.test_client().post("/predict", json={"records": rows}).json
        assert ours["model"]["runtime"] == "onnx" and theirs["model"]["runtime"] == "sklearn"
        assert ours["predictions"] == theirs["predictions"]
        listed = forced.test_client().get("/models").json["models"]
        assert all(m["runtime"] == "sklearn" and "SERVING_RUNTIME" in m["runtime_reason"] for m in listed)
    finally:
        forced.extensions["model_store"].stop()


def test_version_registered_before_compilation_loads_with_sklearn(app, tmp_path):
    """A model folder without the compiled verdict (as every version before this change) still serves."""
    store = app.extensions["model_store"]
    current = store.get()
    folder = tmp_path / "old"
    shutil.copytree(store.cache.folder(current.ref), folder)
    shutil.rmtree(folder / "extra_files")
    old = load_model_dir(folder, current.ref)
    assert old.runtime == "sklearn" and "before compiled inference" in old.runtime_reason
    assert old.session is None and old.estimator is not None


def _copy_of_active(app, tmp_path, name: str):
    """The active version's downloaded folder, copied so a test may change its files."""
    current = app.extensions["model_store"].get()
    folder = tmp_path / name
    shutil.copytree(app.extensions["model_store"].cache.folder(current.ref), folder)
    return folder, current.ref


def test_compiled_version_serves_without_importing_scikit_learn(app, tmp_path):
    """The load-time check compares ONNX with scikit-learn's answers recorded at registration, so a start
    serving a compiled version imports neither scikit-learn nor skops (most of a start's time); the
    pipeline loads on first use: a row ONNX cannot score in float32."""
    folder, ref = _copy_of_active(app, tmp_path, "compiled")
    assert json.loads((folder / "extra_files" / "compiled.json").read_text())["example_probabilities"]
    script = f"""
import json, sys
from serving.loaded_model import load_model_dir
from serving.prediction import predict
from kernel.registry import ModelRef
model = load_model_dir(__import__("pathlib").Path({str(folder)!r}), ModelRef({ref.name!r}, {ref.version!r}))
answer = predict(model, {{"records": [model.example]}}, 10)
before = sorted(m for m in ("sklearn", "skops") if m in sys.modules)
estimator = model.estimator
print(json.dumps({{"runtime": model.runtime, "answer": answer["model"]["runtime"], "before": before,
                  "after": "sklearn" in sys.modules, "classes": estimator.classes_.tolist() == list(model.classes)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"runtime": "onnx", "answer": "onnx", "before": [], "after": True, "classes": True}


def test_compiled_form_is_checked_against_the_recorded_answers(app, tmp_path):
    folder, ref = _copy_of_active(app, tmp_path, "tampered")
    verdict_file = folder / "extra_files" / "compiled.json"
    verdict = json.loads(verdict_file.read_text())
    verdict["example_probabilities"] = [row[1:] + row[:1] for row in verdict["example_probabilities"]]
    verdict_file.write_text(json.dumps(verdict))
    model = load_model_dir(folder, ref)
    assert model.runtime == "sklearn" and "compiled form rejected at load" in model.runtime_reason
    assert model.estimator is not None


def test_version_compiled_before_answers_were_recorded_is_checked_with_scikit_learn(app, tmp_path):
    folder, ref = _copy_of_active(app, tmp_path, "older")
    verdict_file = folder / "extra_files" / "compiled.json"
    verdict = json.loads(verdict_file.read_text())
    del verdict["example_probabilities"]
    verdict_file.write_text(json.dumps(verdict))
    model = load_model_dir(folder, ref)
    assert model.runtime == "onnx" and model.sklearn_form.loaded  # loaded at once, for the comparison


def test_a_batch_scored_again_by_scikit_learn_says_so(client, app, monkeypatch):
    """A row ONNX cannot score in float32 sends the batch to scikit-learn in float64; the answer's model
    object names the runtime that answered, and the pipeline is loaded for it on first use."""
    import serving.prediction

    model = app.extensions["model_store"].get()
    assert model.runtime == "onnx"
    rows = load_builtin("iris").features.sample(5, random_state=2).to_dict("records")
    compiled = client.post("/predict", json={"records": rows}).json
    assert compiled["model"]["runtime"] == "onnx"

    def overflowed(model, columns):
        result = np.full((len(columns[model.feature_names[0]]), len(model.classes)), 0.5, dtype=np.float32)
        result[0] = np.nan
        return result

    monkeypatch.setattr(serving.prediction, "onnx_probabilities", overflowed)
    answer = client.post("/predict", json={"records": rows}).json
    assert answer["model"]["runtime"] == "sklearn"
    assert model.sklearn_form.loaded
    assert answer["predictions"] == compiled["predictions"]
    expected = model.estimator.predict_proba(pd.DataFrame(rows))
    got = np.array([[p[str(c)] for c in model.classes] for p in answer["probabilities"]])
    np.testing.assert_allclose(got, expected, atol=1e-12)
