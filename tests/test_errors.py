"""Every error is JSON of one shape, including unmatched URLs, wrong methods and crashes."""

from __future__ import annotations

import pytest

from tests.conftest import ref


@pytest.mark.parametrize("path", ["/nope", "/predict/extra", "/models/1"])
def test_unknown_url_is_json_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.is_json
    assert response.json["error"] == "not_found"
    assert "/openapi.json" in response.json["message"]


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/predict"), ("put", "/use-model"), ("post", "/models"), ("delete", "/health")]
)
def test_wrong_method_is_json_405(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response.json["error"] == "method_not_allowed"
    assert response.headers["Allow"]


def test_crash_is_json_500_without_traceback(app):
    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.json == {"error": "internal_error", "message": "The server failed; the error is in its log."}


def test_health_and_ready(client, store):
    assert client.get("/health").json["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ref(ready.json["model"]) == store["default"].as_dict()


def test_openapi_describes_the_active_model(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for path in ("/predict", "/models", "/use-model", "/health", "/ready", "/metrics"):
        assert path in spec["paths"]
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    row = body["schema"]["oneOf"][0]
    assert set(row["required"]) == {"sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"}
    assert client.post("/predict", json=body["example"]).status_code == 200


def test_docs_page_serves_swagger_ui(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert b"/openapi.json" in page.data
    with client.get("/docs/static/swagger-ui-bundle.js") as script:
        assert script.status_code == 200
        assert len(script.data) > 100_000


def test_metrics_count_requests(client):
    client.get("/health")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'http_requests_total{endpoint="/health",method="GET",status="200"}' in text


# In-process, so a quick local run (SKIP_DRILLS=1) keeps it; the fuzz drill (tests/test_fuzz.py) checks the answers.
def test_document_declares_every_answer(client):
    document = client.get("/openapi.json").json
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "405" in responses, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= set(responses), (method, path)
            if operation.get("security"):
                assert "401" in responses, (method, path)
            for status, response in responses.items():
                if (path, status) == ("/version", "200"):
                    continue  # MLflow's bare version string under application/json (not JSON): no schema fits it
                assert response.get("content"), f"{method} {path} {status} has no declared body"
    assert {"429", "503", "201", "202"} <= set(document["paths"]["/train"]["post"]["responses"])
    assert "503" in document["paths"]["/use-model"]["post"]["responses"]
