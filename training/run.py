"""One training run: fit, evaluate, record everything in an MLflow run, register, activate (jobs, CLI, bootstrap)."""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable

import mlflow

from kernel.registry import ModelRef, Registry
from training.datasets import Dataset
from training.estimators import build_estimator
from training.pipeline import build_pipeline, evaluate, split
from training.registration import log_model_version
from training.spec import TrainingSpec

log = logging.getLogger(__name__)


def library_versions() -> dict:
    """The versions a model depends on, recorded with it (scikit-learn models are version-bound)."""
    import numpy
    import pandas
    import sklearn
    import skops

    return {
        "python_version": platform.python_version(),
        "sklearn_version": sklearn.__version__,
        "mlflow_version": mlflow.__version__,
        "numpy_version": numpy.__version__,
        "pandas_version": pandas.__version__,
        "skops_version": skops.__version__,
    }


def _no_phase(phase: str) -> None:
    pass


def _no_previous(previous: ModelRef) -> None:
    pass


def run_training(
    registry: Registry,
    spec: TrainingSpec,
    dataset: Dataset,
    run_id: str | None = None,
    on_phase: Callable[[str], None] = _no_phase,
    log_dataset: bool = True,
    before_activate: Callable[[ModelRef], None] = _no_previous,
    on_registered: Callable[[ModelRef], None] = _no_previous,
) -> dict:
    """Train `spec` on `dataset` inside an MLflow run (a new one, or the job's run) and register it.

    Returns `{"model": {"name", "version"}, "run_id", "metrics"}`. Anything that fails before the
    version is registered leaves nothing registered; a failure to activate removes the version again.
    `on_phase` hears "fitting", "evaluating", "converting", "registering" and "plotting" as each begins;
    `log_dataset` False when the job's submitter already logged the dataset as the run's input.
    `before_activate` hears the model active until now (if any) before the new version replaces it;
    `on_registered` hears the new version once it is registered (a job taken over later withdraws it).
    """
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.tracking_uri)
    experiment_id = registry.get_experiment_id()
    model_name = spec.resolved_model_name(dataset)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as run:
        _log_request(spec, dataset, log_dataset)
        train_x, test_x, train_y, test_y = split(dataset.features, dataset.labels)
        model = build_pipeline(dataset.features, spec.estimator, spec.params)
        on_phase("fitting")
        model.fit(train_x, train_y)
        on_phase("evaluating")
        evaluation = evaluate(model, test_x, test_y)
        metrics = evaluation["metrics"]
        mlflow.log_metrics(metrics)
        mlflow.log_dict(evaluation["report"], "classification_report.json")
        tags = {"estimator": spec.estimator, "dataset": dataset.name, "dataset_digest": dataset.digest}
        on_phase("converting")  # log_model_version compiles the ONNX form and checks it
        ref = log_model_version(model, train_x, model_name, tags, metrics, holdout=test_x)
        try:
            on_phase("registering")  # the job may have been taken over meanwhile: then this version goes
        except Exception:
            registry.delete_model_version(ref)
            raise
        on_registered(ref)
        mlflow.set_tags({"model_name": ref.name, "model_version": ref.version})
        activated = spec.activate and _activate(registry, ref, before_activate)
        # Off the path to servable: the version serves from here on; the job ends once its plots are logged
        # (a failure here fails the job, which removes the version and hands the active model back).
        on_phase("plotting")
        from training.plots import log_plots  # matplotlib is loaded by a job, not by every process

        log_plots(model, test_x, test_y, evaluation)
        return {
            "model": ref.as_dict(),
            "run_id": run.info.run_id,
            "metrics": metrics,
            "activated": activated,
            **({} if activated or not spec.activate else {"not_activated": ROLLOUT_RUNNING}),
        }


ROLLOUT_RUNNING = "a rollout is running: the version is registered, not active (GET /rollout)"


def _log_request(spec: TrainingSpec, dataset: Dataset, log_dataset: bool) -> None:
    """What was asked, on which data, with which libraries: the active run's params, tags and input."""
    description = dataset.describe()
    effective = build_estimator(spec.estimator, spec.params).get_params(deep=False)
    mlflow.log_params({"estimator": spec.estimator, **{f"param.{k}": v for k, v in effective.items()}})
    mlflow.log_params({k: v for k, v in description.items() if k not in ("feature_names", "classes")})
    mlflow.set_tags({"estimator": spec.estimator, "dataset": dataset.name, **library_versions()})
    mlflow.log_dict(description, "dataset.json")
    if log_dataset:
        mlflow.log_input(
            mlflow.data.from_pandas(dataset.features, name=dataset.name, digest=dataset.digest), context="training"
        )


def _activate(registry: Registry, ref: ModelRef, before_activate: Callable[[ModelRef], None]) -> bool:
    """Make the new version active (False: a rollout runs, and it stays registered only); if that fails, the
    version goes again."""
    alias = registry.read_alias_state()
    if alias.rollout is not None:
        return False
    # Heard first, so a job that dies after this point can hand the previous model back.
    previous = alias.active
    if previous:
        before_activate(previous)
    try:
        registry.set_active_model(ref)
    except Exception:
        registry.delete_model_version(ref)
        raise
    return True
