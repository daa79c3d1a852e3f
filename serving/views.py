"""The inference blueprint: /ready, /predict, any version by URL, /models, /use-model and MLflow's /ping, /invocations, /version."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, g, jsonify, request

from kernel.auth import require_token
from kernel.config import current_settings
from kernel.errors import APIError
from kernel.http import load_body
from kernel.logs import note_model
from kernel.metrics import count_predictions
from kernel.registry import ModelNotFound, ModelRef, Registry
from serving import routing
from serving.loaded_model import LoadedModel
from serving.mlflow_protocol import document, scoring_body, with_error_codes
from serving.model_store import ModelStore
from serving.prediction import BadInput, predict
from serving.schemas import UseModelRequest
from serving.shadow import Shadow
from serving.versions import Versions

bp = Blueprint("inference", __name__)
log = logging.getLogger(__name__)
bp.record_once(lambda state: state.app.extensions.setdefault("openapi_extenders", []).append(document))


def model_store() -> ModelStore:
    return current_app.extensions["model_store"]


def registry() -> Registry:
    return current_app.extensions["registry"]


def versions() -> Versions:
    return current_app.extensions["versions"]


def shadow() -> Shadow:
    return current_app.extensions["shadow"]


def active_model() -> LoadedModel:
    """The model this request uses, start to finish (one object: never half old, half new)."""
    model = model_store().get()
    if model is None:
        reason = model_store().last_error or "The service has not loaded a model yet."
        raise APIError(503, "not_ready", f"No model is loaded: {reason}", headers={"Retry-After": "5"})
    note_model(model.ref)
    return model


@bp.get("/ready")
@bp.get("/ping")  # SageMaker's health check
def ready():
    """200 with the active model once one is in memory; 503 before."""
    model = active_model()
    return {"status": "ready", "model": model.describe(), "alias": model_store().alias_status()}


@bp.get("/version")
def version():
    """The MLflow version, as `mlflow models serve` answers it (the bare version string)."""
    from mlflow.version import VERSION

    return Response(VERSION, mimetype="application/json")


@bp.post("/predict")
@bp.post("/invocations")  # MLflow's and SageMaker's inference route
@with_error_codes
def predict_view():
    """Labels and probabilities for one row or a batch (JSON, or CSV with a header row); 400 with an example.

    While a rollout runs, a canary's share is answered by the candidate, or a shadow's copied to it
    (serving/routing.py); the answer's `X-Model-Route` says which arm answered."""
    stable = active_model()
    spec = model_store().rollout
    if spec is None or spec.stable != stable.ref:
        return answer(stable, "active")
    body = scoring_body(stable)
    key = request.headers.get(spec.sticky_header) if spec.sticky_header else None
    rows = current_settings().MAX_BATCH_ROWS
    observe = observer(count_drift=True)  # both arms, each against its own baseline
    try:
        model, route, result = routing.route(
            spec, stable, key,
            lambda: versions().by_version(spec.candidate.name, spec.candidate.version),
            lambda model: predict(model, body, rows, observe),
            lambda result: shadow().submit(spec, body, len(result["predictions"]), result),
        )  # fmt: skip
    except BadInput as exc:  # rows that neither version takes: the client's own error, with the stable example
        raise bad_input(exc, stable, "active") from exc
    return answered(model, route, result, {"X-Rollout-Id": spec.id})


@bp.post("/models/<name>/versions/<version>/predict")
@bp.post("/models/<name>/versions/<version>/invocations")  # an MLflow client pointed at /models/<name>/versions/<v>
@with_error_codes
def predict_version(name: str, version: str):
    """The same answer as /predict, from that version; the active model does not change."""
    return answer(versions().by_version(name, version), "version")


@bp.post("/models/<name>/aliases/<alias>/predict")
@bp.post("/models/<name>/aliases/<alias>/invocations")
@with_error_codes
def predict_alias(name: str, alias: str):
    """The same answer as /predict, from the version the alias points to; the active model does not change."""
    return answer(versions().by_alias(name, alias), "alias")


def answer(model: LoadedModel, route: str):
    """Predict with `model` on this request's body; the answer says which version and route answered."""
    note_model(model.ref)
    try:
        # Drift counts what the active version serves, not by-URL tries.
        observe = observer(count_drift=route == "active")
        result = predict(model, scoring_body(model), current_settings().MAX_BATCH_ROWS, observe)
    except BadInput as exc:
        raise bad_input(exc, model, route) from exc
    return answered(model, route, result)


def observer(count_drift: bool):
    """predict()'s observer for this request: it keeps the validated columns for the prediction log (the inputs
    and the out-of-range flag of each row), and counts the rows for drift where the route counts."""
    drift = current_app.extensions["drift"].observe if count_drift else None

    def observe(model: LoadedModel, columns: dict, labels: list) -> None:
        g.scored_columns = columns
        if drift is not None:
            drift(model, columns, labels)

    return observe


def bad_input(exc: BadInput, model: LoadedModel, route: str) -> APIError:
    """A client's bad rows: a 400 with the version's example."""
    headers = {"X-Model-Version": model.ref.version, "X-Model-Route": route}
    return APIError(400, "invalid_input", exc.message, headers, errors=exc.errors, example=model.example)


def answered(model: LoadedModel, route: str, result: dict, headers: dict | None = None):
    """What every answered prediction does: the version in the log line and metrics, the rows in the prediction
    log (their ids into the answer), and the headers that say which version and route answered."""
    note_model(model.ref)
    count_predictions(model.ref.name, model.ref.version, len(result["predictions"]))
    current_app.extensions["prediction_log"].record(g.request_id, model, route, result, g.get("scored_columns"))
    return result, 200, {"X-Model-Version": model.ref.version, "X-Model-Route": route, **(headers or {})}


@bp.get("/models")
def list_models():
    """Every registered version with its creation date, metrics, aliases and whether it is active."""
    return jsonify(models=registry().list_models(current_settings().SERVING_RUNTIME))


@bp.post("/use-model")
@require_token
def use_model():
    """Serve another registered version, on every worker and instance; the old one serves until then."""
    request = load_body(UseModelRequest(), example={"name": "iris-RandomForestClassifier", "version": "1"})
    running = registry().read_alias_state().rollout
    if running is not None:
        raise APIError(409, "rollout_running", f"Rollout {running.id} is running: POST /rollout/promote, "
                       "/rollout/rollback or DELETE /rollout ends it first.", rollout_id=running.id)  # fmt: skip
    try:
        if "alias" in request:
            ref = registry().get_model_version_by_alias(request["name"], request["alias"])
        else:
            ref = ModelRef(request["name"], request["version"])
        loaded = model_store().activate(ref)
    except ModelNotFound as exc:
        wanted = f"version {request['version']}" if "version" in request else f"alias {request['alias']!r}"
        raise APIError(
            404,
            "model_not_found",
            f"No registered model {request['name']!r} with {wanted}. GET /models lists the registered versions.",
        ) from exc
    note_model(loaded.ref)
    return {"model": loaded.describe(), "features": loaded.feature_names, "classes": list(loaded.classes)}
