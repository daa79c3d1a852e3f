"""Bad /predict input: 400 with `errors` and an `example` that gets 200 when sent back as-is."""

from __future__ import annotations

import json

import pytest

from kernel.model_format import FLOAT32_MAX
from service import create_app
from serving.arrays import fast_columns
from serving.prediction import BadInput, parse_rows, row_errors
from tests.conftest import IRIS_ROW, client_of


def without(key):
    return {k: v for k, v in IRIS_ROW.items() if k != key}


def with_value(key, value):
    return {**IRIS_ROW, key: value}


BAD_BODIES = {
    "missing_feature": (without("petal_width_cm"), "petal_width_cm"),
    "unknown_feature": ({**IRIS_ROW, "colour": 3}, "colour"),
    "string_for_number": (with_value("sepal_length_cm", "5.1"), "sepal_length_cm"),
    "word_for_number": (with_value("sepal_length_cm", "long"), "sepal_length_cm"),
    "boolean_for_number": (with_value("sepal_length_cm", True), "sepal_length_cm"),
    "list_for_number": (with_value("sepal_length_cm", [5.1]), "sepal_length_cm"),
    "null": (with_value("petal_length_cm", None), "petal_length_cm"),
    "integer_too_large_for_a_float": (with_value("sepal_length_cm", 10**400), "sepal_length_cm"),
    "empty_object": ({}, "sepal_length_cm"),
    "records_not_list": ({"records": IRIS_ROW}, "records"),
    "empty_batch": ({"records": []}, "records"),
    "empty_instances": ({"instances": []}, "instances"),
    "row_not_object": ({"records": [IRIS_ROW, [1, 2, 3, 4]]}, "records"),
    "bad_row_in_batch": ({"records": [IRIS_ROW, with_value("sepal_width_cm", "x")]}, "records"),
    "bad_row_in_instances": ({"instances": [IRIS_ROW, with_value("sepal_width_cm", "x")]}, "instances"),
    "too_large_for_float32": (with_value("sepal_length_cm", 1e39), "sepal_length_cm"),
    "too_small_for_float32": (with_value("sepal_length_cm", -3.5e38), "sepal_length_cm"),
    "too_large_in_a_batch": (
        {"dataframe_records": [IRIS_ROW, with_value("petal_width_cm", 1e300)]},
        "dataframe_records",
    ),
    "split_wrong_width": ({"dataframe_split": {"columns": list(IRIS_ROW), "data": [[1.0, 2.0]]}}, "dataframe_split"),
    "split_no_data": ({"dataframe_split": {"columns": list(IRIS_ROW)}}, "dataframe_split"),
    "instances_wrong_width": ({"instances": [[1.0, 2.0, 3.0]]}, "instances"),
    "inputs_ragged": ({"inputs": {"sepal_length_cm": [1.0], "sepal_width_cm": [1.0, 2.0]}}, "inputs"),
    "batch_and_extra_key": ({"records": [IRIS_ROW], "debug": True}, "debug"),
}

# Batch bodies of BAD_BODIES whose shape is fine, refused by the validators: the bad row and what is wrong in it.
BATCH_FAULTS = {
    "row_not_object": ("1", "_row"),
    "bad_row_in_batch": ("1", "sepal_width_cm"),
    "bad_row_in_instances": ("1", "sepal_width_cm"),
    "too_large_in_a_batch": ("1", "petal_width_cm"),
}


def error_keys(errors) -> set:
    """Every key of the `errors` object, at any depth (a batch's errors nest by row)."""
    if isinstance(errors, dict):
        return set(errors) | {key for value in errors.values() for key in error_keys(value)}
    if isinstance(errors, list):
        return {key for value in errors for key in error_keys(value)}
    return set()


def check_bad(client, response, field, top=None):
    """400 invalid_input whose `errors` has `field` as a key (and `top` as its top-level key, if given),
    and whose example is accepted when sent back as-is."""
    assert response.status_code == 400, response.json
    body = response.json
    assert body["error"] == "invalid_input"
    assert body["message"]
    assert field in error_keys(body["errors"]), body["errors"]
    if top is not None:
        assert list(body["errors"]) == [top], body["errors"]
    example = body["example"]
    assert set(example) == set(IRIS_ROW)
    assert client.post("/predict", json=example).status_code == 200


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_body_is_400_with_sendable_example(client, name):
    body, field = BAD_BODIES[name]
    batch_key = field in ("records", "instances", "dataframe_records", "dataframe_split", "inputs")
    check_bad(client, client.post("/predict", json=body), field, top=field if batch_key else None)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(client, literal):
    text = json.dumps(IRIS_ROW).replace("0.2", literal)
    response = client.post("/predict", data=text, content_type="application/json")
    check_bad(client, response, "petal_width_cm")
    assert "NaN and Infinity" in json.dumps(response.json["errors"])


@pytest.mark.parametrize("text", ["[1, 2]", '"row"', "42", "null", "true"])
def test_non_object_body_is_400(client, text):
    response = client.post("/predict", data=text, content_type="application/json")
    check_bad(client, response, "body")


@pytest.mark.parametrize("text", ['{"sepal_length_cm": 5.1,', "{'a': 1}", "", "sepal_length_cm=5.1"])
def test_malformed_json_is_400(client, text):
    response = client.post("/predict", data=text, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"] == "malformed_json"
    assert client.post("/predict", json=response.json["example"]).status_code == 200


def test_absurdly_deep_json_is_400_not_500(client):
    response = client.post("/predict", data="[" * 5000 + "]" * 5000, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"] == "malformed_json"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_not_json_is_415(client, content_type):
    response = client.post("/predict", data=json.dumps(IRIS_ROW), content_type=content_type)
    assert response.status_code == 415
    assert response.json["error"] == "unsupported_media_type"
    assert client.post("/predict", json=response.json["example"]).status_code == 200


def test_over_size_limit_is_413(client, app):
    app.config["MAX_CONTENT_LENGTH"] = 10_000
    response = client.post("/predict", json={"records": [IRIS_ROW] * 200})
    assert response.status_code == 413
    assert response.json["error"] == "request_entity_too_large"
    assert "10000 bytes" in response.json["message"]


def test_too_many_rows_is_400(store, app_config):
    client = client_of(create_app({**app_config, "MAX_BATCH_ROWS": 10}))
    response = client.post("/predict", json={"records": [IRIS_ROW] * 11})
    check_bad(client, response, "records")
    assert "at most 10" in json.dumps(response.json["errors"]["records"])


def test_example_is_a_real_training_row(app):
    from training.datasets import load_builtin

    example = app.extensions["model_store"].get().example
    iris = load_builtin("iris").features
    assert ((iris[list(example)] == list(example.values())).all(axis=1)).any()


@pytest.mark.parametrize("name", BAD_BODIES)
def test_fast_path_and_schema_agree(app, name):
    """Every bad body is refused: by its shape before either validator, or by both validators alike."""
    model = app.extensions["model_store"].get()
    body, field = BAD_BODIES[name]
    try:
        rows, key = parse_rows(body, model.feature_names)
    except BadInput as exc:  # the shape is wrong before either validator runs: the error names the key
        assert field in exc.errors, exc.errors
        return
    assert fast_columns(model, rows) is None
    errors = row_errors(model, rows, key)
    if key is None:  # one row: the errors are per field
        assert field in errors, errors
    else:  # a batch: per row index, and the bad row's errors name what is wrong in it
        assert key == field
        index, inner = BATCH_FAULTS[name]
        assert list(errors) == [index] and inner in errors[index], errors


@pytest.mark.parametrize(
    "row",
    [
        IRIS_ROW,
        {k: int(v) for k, v in IRIS_ROW.items()},
        with_value("sepal_length_cm", FLOAT32_MAX),
        with_value("sepal_length_cm", -3.4e38),
        with_value("sepal_length_cm", 1e-300),
        with_value("sepal_length_cm", -0.0),
    ],
)
def test_both_validators_accept_good_rows(app, row):
    model = app.extensions["model_store"].get()
    assert fast_columns(model, [row]) is not None
    assert row_errors(model, [row], None) == {}


@pytest.mark.parametrize("value", [1e39, -1e39, 3.5e38, 10**39])
def test_number_beyond_float32_is_400_naming_the_limit(client, value):
    """The issue's curl: a tree model computes in float32, so 1e39 is a 400, not a 500."""
    response = client.post("/predict", json=with_value("sepal_length_cm", value))
    check_bad(client, response, "sepal_length_cm")
    assert "32-bit" in response.json["errors"]["sepal_length_cm"][0]


@pytest.mark.parametrize("value", [3.4e38, -3.4e38, FLOAT32_MAX])
def test_extreme_but_holdable_numbers_get_200(client, value):
    response = client.post("/predict", json={"records": [with_value(name, value) for name in IRIS_ROW]})
    assert response.status_code == 200, response.json
    probabilities = response.json["probabilities"]
    assert len(probabilities) == 4 and all(abs(sum(p.values()) - 1) < 1e-6 for p in probabilities)


def test_too_many_rows_names_the_key_used(store, app_config):
    client = client_of(create_app({**app_config, "MAX_BATCH_ROWS": 2}))
    response = client.post("/predict", json={"instances": [IRIS_ROW] * 3})
    assert response.status_code == 400
    assert list(response.json["errors"]) == ["instances"]


@pytest.mark.parametrize("count", [1, 2, 3, 10, 64, 65])
def test_probability_objects_equal_the_plain_form(count):
    """The answer's {class: probability} objects, built by a function made per class set, are exactly
    what dict(zip(...)) gives, whatever the class names hold."""
    from serving.prediction import probability_objects

    keys = tuple(f'c{i} "}} {{ \\n' if i % 2 else str(i) for i in range(count))
    rows = [[(r * count + i) / 1000 for i in range(count)] for r in range(50)]
    assert probability_objects(keys)(rows) == [dict(zip(keys, row)) for row in rows]
