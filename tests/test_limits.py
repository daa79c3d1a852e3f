"""Body and CSV limits: 413 for any body over MAX_CONTENT_LENGTH, chunked or not; CSV limits before the parse."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from service import create_app
from tests.conftest import IRIS_ROW, client_of
from training.datasets import DatasetError, from_csv

LIMITS = {"max_rows": 20, "max_columns": 3}


def chunked(client, path: str, body: bytes, content_type: str = "application/json"):
    """A request as a server hands over a chunked one: no Content-Length, the body already de-chunked."""
    return client.post(path, input_stream=io.BytesIO(body),
                       headers={"Transfer-Encoding": "chunked", "Content-Type": content_type})  # fmt: skip


def multipart(fields: dict, csv_text: str) -> tuple[bytes, str]:
    boundary = "----limits-test"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n'
                 f"Content-Type: text/csv\r\n\r\n{csv_text}\r\n--{boundary}--\r\n")  # fmt: skip
    return "".join(parts).encode(), f"multipart/form-data; boundary={boundary}"


def rows_csv(rows: int, features: int = 1) -> str:
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    return header + "\n" + "".join(",".join(["1.5"] * features + ["ab"[i % 2]]) + "\n" for i in range(rows))


@pytest.fixture
def small_app(store, app_config):
    app = create_app({**app_config, "MAX_CONTENT_LENGTH": 10_000, "TRAIN_MAX_COLUMNS": 3})
    yield app
    app.extensions["model_store"].stop()


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/predict", json.dumps({"records": [IRIS_ROW] * 200}).encode(), "application/json"),
        ("/invocations", json.dumps({"instances": [IRIS_ROW] * 200}).encode(), "application/json"),
        ("/use-model", json.dumps({"name": "x" * 20_000, "version": "1"}).encode(), "application/json"),
        ("/train", json.dumps({"estimator": "SVC", "dataset": "iris", "x": "y" * 20_000}).encode(), "application/json"),
        ("/train", *multipart({"target": "label", "estimator": "GaussianNB"}, rows_csv(2_000))),
    ],
)
@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_body_over_the_limit_is_413(small_app, path, body, content_type, transfer):
    assert len(body) > 10_000
    client = client_of(small_app)
    if transfer == "chunked":
        response = chunked(client, path, body, content_type)
    else:
        response = client.post(path, data=body, headers={"Content-Type": content_type})
    assert response.status_code == 413, response.json
    assert response.json["error"] == "request_entity_too_large"
    assert "10000 bytes" in response.json["message"]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "errors"),
    [
        ("/predict", json.dumps({"records": [IRIS_ROW] * 50}).encode(), "application/json", 200, None),
        ("/predict", b"{not json", "application/json", 400, None),
        (
            "/train",
            *multipart({"target": "nope", "estimator": "GaussianNB", "activate": "false"}, rows_csv(40)),
            400,
            {"target": ["no column 'nope'; columns are ['f0', 'label']"]},
        ),
        (
            "/train",
            *multipart({"target": "label", "estimator": "GaussianNB", "activate": "false"}, rows_csv(40, features=5)),
            400,
            {"data": ["6 columns; at most 3 features"]},
        ),
    ],
    ids=["predict", "predict_malformed", "train_unknown_target", "train_too_wide"],
)  # fmt: skip
def test_chunked_body_within_the_limit_is_read_whole(small_app, path, body, content_type, status, errors):
    assert len(body) < 10_000
    response = chunked(client_of(small_app), path, body, content_type)
    assert response.status_code == status, response.json
    if path == "/predict" and status == 200:
        assert len(response.json["predictions"]) == 50
    if path == "/predict" and status == 400:  # the body arrived whole: refused as malformed JSON, not as too large
        assert response.json["error"] == "malformed_json", response.json
    if path == "/train":  # the CSV arrived whole: refused for its content, not as unreadable
        assert response.json["errors"] == errors, response.json


def test_chunked_body_exactly_at_the_limit_is_accepted(small_app):
    row = json.dumps({"records": [IRIS_ROW] * 10})
    body = (row + " " * (10_000 - len(row))).encode()
    assert len(body) == 10_000
    assert chunked(client_of(small_app), "/predict", body).status_code == 200


@pytest.fixture
def no_parse(monkeypatch):
    """pandas' parser fails the test if it is reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("the CSV was parsed")

    monkeypatch.setattr(pd, "read_csv", refuse)


@pytest.mark.parametrize(
    "header",
    ["a,b,c,d,label", ",".join(f"c{i}" for i in range(300_000)) + ",label", 'a,"b,c",d,e,label', "a,b,c,d,label\r"],
)
@pytest.mark.parametrize("as_file", [False, True])
def test_over_wide_csv_is_refused_from_its_header(no_parse, header, as_file):
    content = (header + "\n" + "1,2,3,4,x\n" * 3).encode()
    with pytest.raises(DatasetError) as error:
        from_csv(io.BytesIO(content) if as_file else content, "label", LIMITS)
    assert "at most 3 features" in error.value.errors["data"][0]


def test_over_long_csv_is_refused_without_reading_past_the_limit():
    # Past the limit the file turns to rows the parser would reject: the parse must stop before them.
    content = (rows_csv(LIMITS["max_rows"] + 1) + "1,2,3,4,5,6,7\n" * 1000).encode()
    with pytest.raises(DatasetError) as error:
        from_csv(content, "label", LIMITS)
    assert error.value.errors["data"] == [f"more than {LIMITS['max_rows']} rows; at most {LIMITS['max_rows']}"]


@pytest.mark.parametrize(
    ("csv_text", "features"),
    [
        (rows_csv(20, features=3), ["f0", "f1", "f2"]),  # exactly at both limits
        ('f0,"f,1",f2,label\n' + "1,2,3,a\n4,5,6,b\n" * 10, ["f0", "f,1", "f2"]),  # a quoted comma is not a column
        ('\ufeffx,"a\nb",label\n' + "1,2,a\n3,4,b\n" * 10, ["x", "a\nb"]),  # BOM, a quoted line break in the header
    ],
)
def test_csv_within_the_limits_is_read(csv_text, features):
    dataset = from_csv(io.BytesIO(csv_text.encode()), "label", LIMITS)
    assert len(dataset.features) == 20
    assert list(dataset.features.columns) == features
    assert dataset.features.shape[1] == len(dataset.describe()["feature_names"])


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00 binary", b'"unclosed,quote\n1,2\n'])
def test_unreadable_csv_is_a_dataset_error(content):
    with pytest.raises(DatasetError) as error:
        from_csv(content, "label", LIMITS)
    assert "file" in error.value.errors or "target" in error.value.errors


def test_over_wide_upload_is_400_through_the_endpoint(store, app_config, no_parse):
    client = client_of(create_app({**app_config, "TRAIN_MAX_COLUMNS": 3, "START_MODEL_STORE": False}))
    body, content_type = multipart({"target": "label", "estimator": "GaussianNB"}, rows_csv(10, features=5000))
    response = client.post("/train", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.json["errors"] == {"data": ["5001 columns; at most 3 features"]}
