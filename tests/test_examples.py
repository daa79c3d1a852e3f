"""The files the README uses exist and work as it says: train on examples/customers.csv, predict examples/predict.json."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import ROOT, ref

EXAMPLES = ROOT / "examples"
TOKEN = "examples-test-token"


@pytest.fixture
def app_config(app_config):
    return {**app_config, "API_TOKEN": TOKEN}


def test_customers_csv_has_the_described_columns():
    frame = pd.read_csv(EXAMPLES / "customers.csv")
    assert list(frame.columns) == ["plan", "monthly_spend", "seats", "churned"]
    assert set(frame["plan"]) == {"basic", "pro", "enterprise"}
    assert set(frame["churned"]) == {"yes", "no"}
    assert frame["monthly_spend"].isna().sum() == 12 and frame["seats"].dtype.kind == "i"
    assert len(frame) == 300
    described = (EXAMPLES / "README.md").read_text()
    assert all(f"`{column}`" in described for column in frame.columns)


def test_customers_csv_is_what_its_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_customers", EXAMPLES / "make_customers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.customers().to_csv(index=False) == (EXAMPLES / "customers.csv").read_text()


def test_readme_sequence_trains_on_the_csv_and_predicts_the_json(client):
    with open(EXAMPLES / "customers.csv", "rb") as csv:
        trained = client.post("/train", data={"file": (csv, "customers.csv"), "target": "churned",
                                             "estimator": "RandomForestClassifier", "params": '{"n_estimators": 50}',
                                             "wait": "true"}, headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert trained.status_code == 201, trained.json
    assert trained.json["model"]["name"] == "customers-RandomForestClassifier"
    body = json.loads((EXAMPLES / "predict.json").read_text())
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.json
    assert ref(answer.json["model"]) == ref(trained.json["model"])
    assert answer.json["predictions"] == ["yes"]
