"""Rollouts in one process on the embedded store: a sticky canary, a shadow, promotion, rollback, a candidate
that cannot answer, a hand-moved alias, and every bad input (serving/rollouts.py, serving/routing.py)."""

from __future__ import annotations

import json
import random
import re
import uuid
from types import SimpleNamespace

import pytest

from kernel.registry import ModelRef
from kernel.rollout_spec import REASON_TAG, ROLLOUT_TAG, STATE_TAG, RolloutSpec
from service import create_app
from serving import routing
from serving.prediction import BadInput
from tests.conftest import client_of, mlflow_client

NAME = "iris-rollout"


@pytest.fixture(scope="module")
def versions(store) -> tuple[ModelRef, ModelRef]:
    """Two versions of one model on iris: 1 (LogisticRegression, to be stable) and 2 (GaussianNB, the candidate)."""
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    refs = []
    for estimator in ("LogisticRegression", "GaussianNB"):
        spec = TrainingSpec(estimator, {}, model_name=NAME, activate=False)
        refs.append(ModelRef(**run_training(store["registry"], spec, load_builtin("iris"))["model"]))
    return refs[0], refs[1]


@pytest.fixture
def rollout_app(store, app_config, versions):
    """An app serving version 1 of NAME; any rollout left running is cancelled afterwards."""
    store["registry"].set_active_model(versions[0])
    app = create_app({**app_config, "SHADOW_MAX_ROWS": 50})
    yield app
    client = client_of(app)
    client.delete("/rollout")
    app.extensions["model_store"].stop()
    store["registry"].set_active_model(store["default"])


def rows(count: int, seed: int = 0) -> list[dict]:
    generator = random.Random(seed)
    names = ("sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm")
    return [{n: round(generator.uniform(0.1, 7.5), 1) for n in names} for _ in range(count)]


def start(client, versions, **spec) -> dict:
    body = {"candidate": versions[1].as_dict(), "mode": "canary", "steps": [10, 50],
            "sticky": {"header": "X-User-Id"}, **spec}  # fmt: skip
    body = {key: value for key, value in body.items() if value is not None}
    answer = client.post("/rollout", json=body)
    assert answer.status_code == 201, answer.get_json()
    return answer.get_json()


def arms(client, keys: list[str], row: dict) -> dict[str, str]:
    """The route each key's request took."""
    routes = {}
    for key in keys:
        answer = client.post("/predict", json=row, headers={"X-User-Id": key})
        assert answer.status_code == 200, answer.get_json()
        routes[key] = answer.headers["X-Model-Route"]
        expected = {"stable": "1", "candidate": "2"}[routes[key]]
        assert answer.headers["X-Model-Version"] == expected == answer.get_json()["model"]["version"]
    return routes


def test_a_sticky_canary_splits_by_key_and_keeps_each_key_on_its_arm(rollout_app, versions):
    client = client_of(rollout_app)
    state = start(client, versions)
    assert state["percent"] == 10 and state["rollout"]["candidate"] == versions[1].as_dict()
    assert (state["state"], state["reason"]) == ("running", f"step 1 of {len(state['rollout']['steps'])}")
    keys = [f"user-{i}" for i in range(2000)]
    first = arms(client, keys, rows(1)[0])
    share = sum(route == "candidate" for route in first.values()) / len(keys)
    assert 0.08 <= share <= 0.12, share
    assert arms(client, keys[:500], rows(1, seed=1)[0]) == {k: first[k] for k in keys[:500]}  # replayed: same arm
    # Without the header, `missing: stable`: the stable version answers.
    assert {client.post("/predict", json=rows(1)[0]).headers["X-Model-Route"] for _ in range(50)} == {"stable"}
    stepped = client.post("/rollout/promote")
    assert stepped.status_code == 200 and stepped.get_json()["percent"] == 50
    second = arms(client, keys, rows(1)[0])
    assert all(second[k] == "candidate" for k in keys if first[k] == "candidate"), "a candidate key left the candidate"
    assert 0.46 <= sum(route == "candidate" for route in second.values()) / len(keys) <= 0.54
    counted = client.get("/rollout").get_json()
    assert counted["arms"]["candidate"]["requests"] == sum(r == "candidate" for r in [*first.values(), *second.values()]) + sum(
        first[k] == "candidate" for k in keys[:500])  # fmt: skip
    assert counted["arms"]["candidate"]["p95_seconds"] is not None and counted["prediction_psi"] is not None


def test_the_candidates_answer_is_the_candidates_own(rollout_app, versions):
    """A canary answer from the candidate equals what that version answers by URL; a stable one, the active's."""
    client = client_of(rollout_app)
    start(client, versions, steps=[50])
    batch = {"records": rows(20, seed=3)}
    by_url = {ref.version: client.post(f"/models/{NAME}/versions/{ref.version}/predict", json=batch).get_json()
              for ref in versions}  # fmt: skip
    seen = set()
    for index in range(40):
        answer = client.post("/predict", json=batch, headers={"X-User-Id": f"k{index}"})
        version = answer.headers["X-Model-Version"]
        seen.add(version)
        assert answer.get_json()["predictions"] == by_url[version]["predictions"]
        assert answer.get_json()["probabilities"] == by_url[version]["probabilities"]
    assert seen == {"1", "2"}


def test_promotion_after_the_last_step_moves_the_alias_and_records_the_outcome(rollout_app, versions, store):
    client = client_of(rollout_app)
    state = start(client, versions, steps=[10])
    assert client.post("/use-model", json=versions[1].as_dict()).get_json()["error"] == "rollout_running"
    promoted = client.post("/rollout/promote")
    assert promoted.status_code == 200 and promoted.get_json()["state"] == "promoted"
    mlflow = mlflow_client(store["uri"])
    assert str(mlflow.get_model_version_by_alias(NAME, "active").version) == versions[1].version
    tags = mlflow.get_model_version(NAME, versions[1].version).tags
    assert tags[STATE_TAG] == "promoted" and "promote" in tags[REASON_TAG]
    assert ROLLOUT_TAG not in mlflow.get_registered_model(NAME).tags
    assert "candidate" not in mlflow.get_registered_model(NAME).aliases
    run = mlflow.get_run(state["rollout"]["run_id"])
    assert run.data.params["mode"] == "canary" and run.data.tags[STATE_TAG] == "promoted"
    assert client.get("/rollout").get_json() == {"state": "none"}
    answer = client.post("/predict", json=rows(1)[0], headers={"X-User-Id": "anyone"})
    assert answer.headers["X-Model-Version"] == versions[1].version and answer.headers["X-Model-Route"] == "active"
    assert client.post("/rollout/promote").get_json()["error"] == "no_rollout"


def test_a_rollback_leaves_the_stable_version_serving(rollout_app, versions, store):
    client = client_of(rollout_app)
    start(client, versions, steps=[99])
    assert client.post("/rollout", json={"candidate": versions[1].as_dict(), "mode": "shadow"}).status_code == 409
    ended = client.post("/rollout/rollback")
    assert ended.status_code == 200 and ended.get_json()["state"] == "rolled_back"
    mlflow = mlflow_client(store["uri"])
    assert str(mlflow.get_model_version_by_alias(NAME, "active").version) == versions[0].version
    assert mlflow.get_model_version(NAME, versions[1].version).tags[STATE_TAG] == "rolled_back"
    routes = {client.post("/predict", json=rows(1)[0], headers={"X-User-Id": f"u{i}"}).headers["X-Model-Route"]
              for i in range(30)}  # fmt: skip
    assert routes == {"active"}
    assert client.delete("/rollout").get_json()["error"] == "no_rollout"


def test_a_candidate_that_cannot_load_never_reaches_a_client(rollout_app, versions, store):
    """The candidate cannot be loaded on this instance: every request on its arm is answered by the stable
    version (`fallback`), and counted as a candidate error."""
    client = client_of(rollout_app)
    spec = RolloutSpec(id=uuid.uuid4().hex[:12], candidate=versions[1], stable=versions[0], mode="canary",
                       steps=(50,), sticky_header="X-User-Id")  # fmt: skip
    store["registry"].start_rollout(spec)  # started elsewhere: this instance learns of it in its poll
    model_store = rollout_app.extensions["model_store"]
    model_store.cache.mark_failed(versions[1], "a broken candidate (test)")
    model_store.follow_registry()
    routes = []
    for index in range(100):
        answer = client.post("/predict", json=rows(1)[0], headers={"X-User-Id": f"f{index}"})
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == versions[0].version
        routes.append(answer.headers["X-Model-Route"])
    assert set(routes) == {"stable", "fallback"}
    candidate = client.get("/rollout").get_json()["arms"]["candidate"]
    assert candidate["errors"] == routes.count("fallback") == candidate["requests"]


def test_a_candidate_that_raises_or_rejects_rows_falls_back_to_stable():
    """routing.route: a candidate that raises, or rejects rows the stable version takes, gives the stable answer;
    rows that both reject are the client's error."""
    spec = RolloutSpec(id="r1", candidate=ModelRef("m", "2"), stable=ModelRef("m", "1"), mode="canary", steps=(99,),
                       sticky_header="K")  # fmt: skip
    stable, candidate = (
        SimpleNamespace(ref=spec.stable, classes=("a",)),
        SimpleNamespace(ref=spec.candidate, classes=("a",)),
    )
    key = next(f"k{i}" for i in range(1000) if spec.on_candidate(f"k{i}"))

    def scorer(candidate_error: Exception | None, stable_error: Exception | None = None):
        def score(model):
            error = candidate_error if model is candidate else stable_error
            if error is not None:
                raise error
            return {"predictions": ["a"], "version": model.ref.version}

        return score

    for error in (RuntimeError("boom"), BadInput({"row": "rejected"})):
        model, route, result = routing.route(spec, stable, key, lambda: candidate, scorer(error), lambda _: None)
        assert (model, route, result["version"]) == (stable, "fallback", "1")
    with pytest.raises(BadInput):
        routing.route(
            spec, stable, key, lambda: candidate, scorer(BadInput({"row": "x"}), BadInput({"row": "x"})), lambda _: None
        )
    model, route, _ = routing.route(spec, stable, key, lambda: candidate, scorer(None), lambda _: None)
    assert (model, route) == (candidate, "candidate")


def test_a_shadow_answers_as_without_it_and_counts_agreement(rollout_app, versions):
    client = client_of(rollout_app)
    requests = [{"records": rows(3, seed=i)} for i in range(60)]

    def without_ids(body: bytes) -> bytes:  # prediction ids are new on every request, by design
        return re.sub(rb',"prediction_ids":\[[^\]]*\]', b"", body)

    before = [without_ids(client.post("/predict", json=body).get_data()) for body in requests]
    started = start(client, versions, mode="shadow", steps=None, shadow_percent=100)
    assert started["reason"] == "shadowing 100 % of the requests"
    during = [without_ids(client.post("/predict", json=body).get_data()) for body in requests]
    assert during == before  # byte for byte, but the ids: the client gets the stable answer
    assert b"prediction_ids" not in before[0] and b'"predictions"' in before[0]
    rollout_app.extensions["shadow"].drain()
    expected = 0
    for body in requests:
        stable = client.post(f"/models/{NAME}/versions/1/predict", json=body).get_json()["predictions"]
        candidate = client.post(f"/models/{NAME}/versions/2/predict", json=body).get_json()["predictions"]
        expected += sum(a == b for a, b in zip(stable, candidate, strict=True))
    shadow = client.get("/rollout").get_json()["shadow"]
    assert shadow["rows"] == 180
    assert shadow["agreement"] == pytest.approx(expected / 180)
    # Drift: the stable version counted every row it answered, the candidate the rows it scored in the shadow.
    drift = {entry["route"]: entry for entry in client.get("/drift").get_json()["models"]}
    assert (drift["stable"]["version"], drift["stable"]["rows"]) == ("1", len(requests) * 3 * 2)
    assert (drift["candidate"]["version"], drift["candidate"]["rows"]) == ("2", 180)
    # A batch over SHADOW_MAX_ROWS (50 here) is not shadowed: dropped and counted.
    assert client.post("/predict", json={"records": rows(51)}).status_code == 200
    assert client.get("/rollout").get_json()["arms"]["shadow"]["dropped"] == 1


def test_drift_counts_each_arm_of_a_canary_against_its_own_baseline(rollout_app, versions):
    client = client_of(rollout_app)
    start(client, versions)
    client.post("/rollout/promote")  # 50 %
    routes = arms(client, [f"user-{i}" for i in range(300)], rows(1)[0])
    answered = {arm: sum(route == arm for route in routes.values()) for arm in ("stable", "candidate")}
    assert min(answered.values()) > 100
    entries = client.get("/drift?window=600").get_json()["models"]
    assert {(e["route"], e["name"], e["version"], e["rows"]) for e in entries} == {
        ("stable", NAME, "1", answered["stable"]), ("candidate", NAME, "2", answered["candidate"])}  # fmt: skip
    [candidate] = client.get(f"/drift?name={NAME}&version=2").get_json()["models"]
    assert candidate["route"] == "candidate" and candidate["status"] == "insufficient_data"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'model_drift_rows{{model="{NAME}",version="2"}} {answered["candidate"]}.0' in metrics
    rollout = client.get("/rollout").get_json()["rollout"]
    assert f'rollout_percent{{mode="canary",rollout="{rollout["id"]}"}} 50.0' in metrics
    assert (f'rollout_running_info{{candidate_version="2",mode="canary",model="{NAME}",rollout="{rollout["id"]}",'
            'stable_version="1"} 1.0') in metrics  # fmt: skip
    # A by-URL answer is not counted; once the rollout ends, the candidate is no longer served here.
    assert client.post(f"/models/{NAME}/versions/2/predict", json=rows(1)[0]).status_code == 200
    assert client.get(f"/drift?name={NAME}&version=2").get_json()["models"][0]["rows"] == answered["candidate"]
    assert client.delete("/rollout").status_code == 200
    assert [e["version"] for e in client.get("/drift").get_json()["models"]] == ["1"]
    assert "rollout_percent{" not in client.get("/metrics").get_data(as_text=True)
    assert client.get(f"/drift?name={NAME}&version=2").status_code == 404


def test_an_alias_moved_by_hand_ends_the_rollout_as_overridden(rollout_app, versions, store):
    client = client_of(rollout_app)
    start(client, versions)
    mlflow = mlflow_client(store["uri"])
    mlflow.set_registered_model_alias(NAME, "active", versions[1].version)  # as the MLflow UI would
    rollout_app.extensions["model_store"].follow_registry()  # the next poll
    assert client.get("/rollout").get_json() == {"state": "none"}
    tags = mlflow.get_model_version(NAME, versions[1].version).tags
    assert tags[STATE_TAG] == "overridden" and "by hand" in tags[REASON_TAG]
    assert ROLLOUT_TAG not in mlflow.get_registered_model(NAME).tags


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"mode": "blue-green"}, "mode"),
        ({"steps": []}, "steps"),
        ({"steps": [50, 20]}, "steps"),
        ({"steps": [0, 50]}, "steps"),
        ({"steps": [50, 100]}, "steps"),
        ({"steps": ["10"]}, "steps"),
        ({"mode": "shadow", "steps": [10]}, "steps"),
        ({"mode": "shadow", "steps": None, "shadow_percent": 0}, "shadow_percent"),
        ({"mode": "shadow", "steps": None, "shadow_percent": 101}, "shadow_percent"),
        ({"shadow_percent": 10}, "shadow_percent"),
        ({"sticky": {"header": "X User"}}, "sticky"),
        ({"sticky": {"header": "Authorization"}}, "sticky"),
        ({"sticky": {"header": "X-User-Id", "missing": "candidate"}}, "sticky"),
        ({"candidate": {"name": NAME}}, "candidate"),
        ({"step_min_requests": 0}, "step_min_requests"),
        ({"step_min_seconds": -1}, "step_min_seconds"),
        ({"guardrails": {"max_error_rate_delta": 1.5}}, "max_error_rate_delta"),
        ({"guardrails": {"max_p95_latency_ratio": 0.5}}, "max_p95_latency_ratio"),
        ({"guardrails": {"min_agreement": -0.1}}, "min_agreement"),
        ({"guardrails": {"max_prediction_psi": "high"}}, "max_prediction_psi"),
        ({"guardrails": {"max_latency": 2}}, "max_latency"),
        ({"auto_promote": "maybe"}, "auto_promote"),
    ],
)
def test_bad_rollouts_are_rejected_and_change_nothing(rollout_app, versions, change, field):
    client = client_of(rollout_app)
    body = {"candidate": versions[1].as_dict(), "mode": "canary", "steps": [10, 50], **change}
    body = {key: value for key, value in body.items() if value is not None}
    answer = client.post("/rollout", json=body)
    assert answer.status_code == 400, answer.get_json()
    assert answer.get_json()["error"] == "invalid_request"
    assert field in json.dumps(answer.get_json()), answer.get_json()
    assert client.get("/rollout").get_json() == {"state": "none"}


def test_rollouts_of_what_cannot_be_a_candidate(rollout_app, versions, wine_tree):
    client = client_of(rollout_app)
    unknown = client.post("/rollout", json={"candidate": {"name": NAME, "version": "99"}, "mode": "shadow"})
    assert unknown.status_code == 404 and unknown.get_json()["error"] == "model_not_found"
    active = client.post("/rollout", json={"candidate": versions[0].as_dict(), "mode": "shadow"})
    assert active.status_code == 409 and active.get_json()["error"] == "candidate_active"
    other = client.post("/rollout", json={"candidate": wine_tree.as_dict(), "mode": "shadow"})
    assert other.status_code == 422 and other.get_json()["error"] == "incompatible_candidate"
    assert "petal_length_cm" in other.get_json()["missing_features"] and other.get_json()["extra_classes"]
    assert client.post("/rollout", json={"candidate": versions[1].as_dict(), "mode": "shadow"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401  # fmt: skip
    assert client.get("/rollout").get_json() == {"state": "none"}


def test_a_job_that_would_activate_registers_only_while_a_rollout_runs(rollout_app, versions, store):
    from training.datasets import load_builtin
    from training.run import run_training
    from training.spec import TrainingSpec

    client = client_of(rollout_app)
    start(client, versions)
    result = run_training(store["registry"], TrainingSpec("GaussianNB", {}, model_name=NAME, activate=True),
                          load_builtin("iris"))  # fmt: skip
    assert result["activated"] is False and "rollout" in result["not_activated"]
    mlflow = mlflow_client(store["uri"])
    assert str(mlflow.get_model_version_by_alias(NAME, "active").version) == versions[0].version
    assert mlflow.get_model_version(NAME, result["model"]["version"]) is not None
    assert client.get("/rollout").get_json()["state"] == "running"
    # Through POST /train, the job's answer says why too.
    answer = client.post("/train", json={"estimator": "GaussianNB", "dataset": "iris", "model_name": NAME,
                                         "activate": True, "wait": True})  # fmt: skip
    assert answer.status_code == 201, answer.get_json()
    waited = answer.get_json()
    assert waited["activated"] is False and "rollout" in waited["not_activated"], waited
    assert client.get(answer.headers["Location"]).get_json()["result"] == waited
    assert str(mlflow.get_model_version_by_alias(NAME, "active").version) == versions[0].version
