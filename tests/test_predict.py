"""POST /predict in every accepted body form, answered with labels and probabilities."""

from __future__ import annotations

import pytest

from tests.conftest import DEFAULT_NAME, IRIS_ROW

VIRGINICA = {"sepal_length_cm": 7.7, "sepal_width_cm": 3.0, "petal_length_cm": 6.1, "petal_width_cm": 2.3}
COLUMNS = list(IRIS_ROW)


def test_one_row_gets_label_and_probabilities(client, store):
    response = client.post("/predict", json=IRIS_ROW)
    assert response.status_code == 200
    body = response.json
    assert body["model"] == {**store["default"].as_dict(), "runtime": "onnx"}
    assert body["model"]["name"] == DEFAULT_NAME
    assert body["predictions"] == ["setosa"]
    assert set(body["probabilities"][0]) == {"setosa", "versicolor", "virginica"}
    assert sum(body["probabilities"][0].values()) == pytest.approx(1.0)
    assert max(body["probabilities"][0], key=body["probabilities"][0].get) == "setosa"


@pytest.mark.parametrize(
    "body",
    [
        {"records": [IRIS_ROW, VIRGINICA]},
        {"dataframe_records": [IRIS_ROW, VIRGINICA]},
        {"dataframe_split": {"columns": COLUMNS, "data": [list(IRIS_ROW.values()), list(VIRGINICA.values())]}},
        {"dataframe_split": {"columns": COLUMNS[::-1], "data": [list(IRIS_ROW.values())[::-1], list(VIRGINICA.values())[::-1]]}},
        {"instances": [IRIS_ROW, VIRGINICA]},
        {"instances": [list(IRIS_ROW.values()), list(VIRGINICA.values())]},
        {"inputs": {c: [IRIS_ROW[c], VIRGINICA[c]] for c in COLUMNS}},
        {"inputs": [IRIS_ROW, VIRGINICA]},
    ],
    ids=["records", "dataframe_records", "dataframe_split", "split_reordered", "instances", "instances_lists",
         "inputs_columns", "inputs_records"],
)  # fmt: skip
def test_batch_forms(client, body):
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert response.json["predictions"] == ["setosa", "virginica"]
    assert len(response.json["probabilities"]) == 2


def test_integers_are_numbers(client):
    row = {name: int(value) for name, value in VIRGINICA.items()}
    response = client.post("/predict", json=row)
    assert response.status_code == 200
    assert response.json["predictions"][0] in {"versicolor", "virginica"}


def test_batch_answers_in_row_order(client):
    rows = [IRIS_ROW, VIRGINICA] * 50
    response = client.post("/predict", json={"records": rows})
    assert response.status_code == 200
    assert response.json["predictions"] == ["setosa", "virginica"] * 50


def test_content_type_with_charset_is_json(client):
    import json

    response = client.post("/predict", data=json.dumps(IRIS_ROW), content_type="application/json; charset=utf-8")
    assert response.status_code == 200, response.json
    assert response.json["predictions"] == ["setosa"]
