"""Safe by default: the management endpoints always need a token, /predict only with PREDICT_TOKEN, the Host check."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import stat
import subprocess
from pathlib import Path

import pytest

from kernel.auth import ensure_token
from kernel.config import ConfigError
from service import create_app
from tests.conftest import DEFAULT_NAME, IRIS_ROW, ROOT, TOKEN

USE_MODEL = {"name": DEFAULT_NAME, "version": "1"}
MANAGEMENT = [
    ("post", "/train", {"estimator": "GaussianNB", "dataset": "nope"}),  # 400 once past the token
    ("get", "/train/jobs/" + "0" * 32, None),  # 404 once past the token
    ("post", "/use-model", {"name": DEFAULT_NAME, "version": "999"}),  # 404 once past the token
]
PREDICT = [("post", "/predict", IRIS_ROW), ("post", "/invocations", {"instances": [IRIS_ROW]})]


@pytest.fixture(autouse=True)
def no_auth_settings_from_the_shell(monkeypatch):
    for name in ("API_TOKEN", "API_AUTH", "PREDICT_TOKEN", "ALLOWED_HOSTS"):
        monkeypatch.delenv(name, raising=False)


def call(client, method, path, body, headers=None):
    return getattr(client, method)(path, json=body, headers=headers or {})


@pytest.fixture
def open_config(app_config) -> dict:
    """The test config without an API_TOKEN: the service generates one."""
    return {key: value for key, value in app_config.items() if key != "API_TOKEN"}


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT)
@pytest.mark.parametrize("token_source", ["API_TOKEN", "generated"])
def test_management_endpoints_need_the_token(store, app_config, open_config, method, path, body, token_source):
    config = app_config if token_source == "API_TOKEN" else open_config
    app = create_app(config)
    token = (
        TOKEN
        if token_source == "API_TOKEN"
        else (Path(app.extensions["settings"].STATE_DIR) / "api-token").read_text().strip()
    )
    client = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": token}, {"Authorization": f"Bearer {token}x"}):  # fmt: skip
        refused = call(client, method, path, body, headers)
        assert refused.status_code == 401, headers
        assert refused.json["error"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert token not in refused.get_data(as_text=True)
    allowed = call(client, method, path, body, {"Authorization": f"Bearer {token}"})
    assert allowed.status_code in (400, 404), allowed.json
    for method_, path_, body_ in PREDICT:  # predictions stay open
        assert call(client, method_, path_, body_).status_code == 200


def test_api_auth_off_opens_them_and_warns_at_every_start(store, open_config, caplog):
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="kernel.auth"):
            caplog.clear()
            app = create_app({**open_config, "API_AUTH": "off"})
        assert sum("API_AUTH=off" in r.getMessage() for r in caplog.records) == 1
    client = app.test_client()
    for method, path, body in MANAGEMENT:
        assert call(client, method, path, body).status_code in (400, 404)
    assert not os.path.exists(os.path.join(app.extensions["settings"].STATE_DIR, "api-token"))


@pytest.mark.parametrize(("method", "path", "body"), PREDICT)
def test_predict_token_when_set(store, app_config, method, path, body):
    client = create_app({**app_config, "PREDICT_TOKEN": "p-token"}).test_client()
    assert call(client, method, path, body).status_code == 401
    assert call(client, method, path, body, {"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    assert call(client, method, path, body, {"Authorization": "Bearer p-token"}).status_code == 200
    for open_path in ("/health", "/ready", "/models", "/openapi.json", "/metrics"):
        assert client.get(open_path).status_code == 200


def test_feedback_token_opens_feedback_only(store, app_config):
    client = create_app({**app_config, "FEEDBACK_TOKEN": "f-token"}).test_client()
    feedback = {"feedback": [{"prediction_id": "unknown-id", "label": "setosa"}]}
    for token, status in (("f-token", 200), (TOKEN, 200), ("nope", 401), (None, 401)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = client.post("/feedback", json=feedback, headers=headers)
        assert answer.status_code == status, (token, answer.get_json())
        if status == 200:
            assert answer.get_json()["unknown_ids"] == ["unknown-id"]
    assert "FEEDBACK_TOKEN" in client.post("/feedback", json=feedback).get_json()["message"]
    # It opens nothing else.
    headers = {"Authorization": "Bearer f-token"}
    assert client.post("/use-model", json=USE_MODEL, headers=headers).status_code == 401
    assert client.get("/rollout", headers=headers).status_code == 401
    assert client.post("/train", json={"estimator": "SVC", "dataset": "iris"}, headers=headers).status_code == 401


def test_generated_token_is_private_logged_once_with_its_path(store, open_config, caplog):
    with caplog.at_level(logging.INFO):
        first = create_app(open_config)
    path = os.path.join(first.extensions["settings"].STATE_DIR, "api-token")
    token = Path(path).read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    told = [r.getMessage() for r in caplog.records if token in r.getMessage()]
    assert len(told) == 1 and path in told[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = create_app(open_config)  # a restart: the same token, not logged again
    assert not [r for r in caplog.records if token in r.getMessage()]
    answer = second.test_client().post("/use-model", json=USE_MODEL, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200


def test_a_given_token_is_never_logged(store, app_config, caplog):
    with caplog.at_level(logging.DEBUG):
        app = create_app({**app_config, "PREDICT_TOKEN": "p-secret-token", "FEEDBACK_TOKEN": "f-secret-token"})
        client = app.test_client()
        client.post("/use-model", json=USE_MODEL, headers={"Authorization": "Bearer nope"})
        client.post("/use-model", json=USE_MODEL, headers={"Authorization": f"Bearer {TOKEN}"})
        client.post("/predict", json=IRIS_ROW)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text and "p-secret-token" not in text and "f-secret-token" not in text
    assert "f-secret-token" not in repr(app.extensions["auth"]) and "f-secret-token" not in str(
        app.extensions["settings"]
    )
    assert TOKEN not in repr(app.config) and TOKEN not in str(app.extensions["settings"])
    assert TOKEN not in repr(app.extensions["auth"])


def _race(path: str) -> tuple[str, bool]:
    return ensure_token(Path(path))


def test_token_made_once_when_processes_start_together(tmp_path):
    path = str(tmp_path / "state" / "api-token")
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.map(_race, [path] * 32)
    assert len({token for token, _ in results}) == 1
    assert sum(made for _, made in results) == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path / "state") == ["api-token"]  # no candidate left behind


def test_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "api-token"
    path.write_text("")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="empty"):
        ensure_token(path)


def test_token_file_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:  # only root can give a file away
        message = "giving the token file to another user needs root"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI (CI=1) runs the tests as root so that this check runs")
        pytest.skip(f"{message} (CI runs it as root)")
    path = tmp_path / "api-token"
    path.write_text("planted-token\n")
    os.chmod(path, 0o600)
    os.chown(path, 4321, 4321)
    with pytest.raises(ConfigError, match="another user"):
        ensure_token(path)


def test_a_token_file_readable_by_others_is_made_private(tmp_path):
    path = tmp_path / "api-token"
    path.write_text("kept-token\n")
    os.chmod(path, 0o644)
    assert ensure_token(path) == ("kept-token", False)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_make_token_prints_the_services_token(store, open_config):
    app = create_app(open_config)
    kept = (Path(app.extensions["settings"].STATE_DIR) / "api-token").read_text().strip()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "STATE_DIR": open_config["STATE_DIR"], "API_TOKEN": ""}
    done = subprocess.run(["make", "-s", "token"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == kept + "\n"
    off = subprocess.run(["make", "-s", "token"], cwd=ROOT, env={**env, "API_AUTH": "off"}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert off.returncode != 0 and "API_AUTH=off" in off.stderr and not off.stdout


@pytest.mark.parametrize(
    ("bind", "allowed_hosts", "host", "answered"),
    [
        ("127.0.0.1", None, "localhost", True),
        ("127.0.0.1", None, "localhost:8000", True),
        ("127.0.0.1", None, "127.0.0.1:8000", True),
        ("127.0.0.1", None, "[::1]:8000", True),
        ("127.0.0.1", None, "LOCALHOST:1", True),
        ("::1", None, "[::1]", True),
        ("localhost", None, "127.0.0.1", True),
        ("127.0.0.1", None, "evil.example", False),  # DNS rebinding: the attacker's name, our address
        ("127.0.0.1", None, "evil.example:8000", False),
        ("127.0.0.1", None, "localhost.evil.example", False),
        ("127.0.0.1", None, "127.0.0.1.nip.io", False),
        ("127.0.0.1", None, "", False),
        ("127.0.0.1", "api.example", "api.example:443", True),
        ("127.0.0.1", "api.example", "localhost", False),
        ("127.0.0.1", "*", "anything.example", True),
        ("0.0.0.0", None, "anything.example", True),  # a public bind: a proxy or load balancer names it
        ("0.0.0.0", "api.example,localhost", "other.example", False),
        (None, None, "abc.execute-api.us-east-1.amazonaws.com", True),  # Lambda: no bind
    ],
)
def test_host_check(store, app_config, bind, allowed_hosts, host, answered):
    config = {**app_config, "HOST": bind, "START_MODEL_STORE": False}
    if allowed_hosts is not None:
        config["ALLOWED_HOSTS"] = allowed_hosts
    client = create_app(config).test_client()
    for path in ("/health", "/models", "/use-model"):
        response = client.get(path, headers={"Host": host}) if path != "/use-model" else client.post(
            path, json=USE_MODEL, headers={"Host": host})  # fmt: skip
        if answered:
            assert response.status_code != 400 or response.json["error"] != "host_not_allowed"
        else:
            assert response.status_code == 400
            assert response.json["error"] == "host_not_allowed"
            assert "ALLOWED_HOSTS" in response.json["message"]


@pytest.mark.parametrize("path", ["/predict", "/train", "/use-model", "/models", "/health", "/openapi.json"])
def test_no_cors_headers(client, path):
    origin = {"Origin": "https://evil.example"}
    preflight = client.options(path, headers={**origin, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    answer = client.post(path, json={}, headers=origin) if path != "/health" else client.get(path, headers=origin)
    for response in (preflight, answer):
        assert not [h for h in response.headers.keys() if h.lower().startswith("access-control-")], response.headers


def test_cross_site_form_post_to_train_cannot_train(store, app_config):
    """What a page on another site can send from the user's browser: a 'simple' multipart form POST, no token."""
    app = create_app(app_config)
    before = store["registry"].search_model_versions()
    csv_text = "x,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(40))
    form = {"file": (io.BytesIO(csv_text.encode()), "data.csv"), "target": "label", "estimator": "GaussianNB",
            "wait": "true"}  # fmt: skip
    response = app.test_client().post(
        "/train", data=form, content_type="multipart/form-data",
        headers={"Origin": "https://evil.example", "Referer": "https://evil.example/page", "Host": "localhost:8000"},
    )  # fmt: skip
    assert response.status_code == 401
    assert "access-control-allow-origin" not in {h.lower() for h in response.headers.keys()}
    assert store["registry"].search_model_versions() == before
    assert store["registry"].get_active_model() == store["default"]


def test_openapi_declares_the_token_on_exactly_the_management_endpoints(client):
    paths = client.get("/openapi.json").json["paths"]
    for path in ("/train", "/train/jobs/{job_id}", "/use-model", "/rollout", "/rollout/promote"):
        assert path in paths
    for path, operations in paths.items():
        management = path in ("/use-model", "/train", "/rollout", "/feedback") or path.startswith(
            ("/train/", "/rollout/")
        )
        for method, operation in operations.items():
            assert (operation.get("security") == [{"bearer": []}]) == management, (method, path)
            if management:
                assert "401" in operation["responses"], (method, path)


@pytest.mark.parametrize(
    ("settings", "guarded"),
    [
        (
            {"PREDICT_TOKEN": "p-token"},
            {
                "/train",
                "/train/jobs/{job_id}",
                "/use-model",
                "/rollout",
                "/rollout/promote",
                "/rollout/rollback",
                "/feedback",
                "/predict",
                "/invocations",
            },
        ),
        ({"API_AUTH": "off", "API_TOKEN": None}, set()),
        ({"API_AUTH": "off", "API_TOKEN": None, "PREDICT_TOKEN": "p-token"}, {"/predict", "/invocations"}),
    ],
)
def test_openapi_declares_the_token_where_these_settings_ask_for_one(app_config, settings, guarded):
    """The document follows the settings: what a client must send is what the document says, no more."""
    config = {**app_config, **settings}
    client = create_app({k: v for k, v in config.items() if v is not None}).test_client()
    paths = client.get("/openapi.json").json["paths"]
    declared = {path for path, operations in paths.items() if any(op.get("security") for op in operations.values())}
    assert declared == guarded
    for path in guarded:
        assert "401" in paths[path]["post" if "jobs" not in path else "get"]["responses"], path
    for path in paths.keys() - guarded:  # and no 401 where nothing asks for a token
        assert all("401" not in op["responses"] for op in paths[path].values()), path
