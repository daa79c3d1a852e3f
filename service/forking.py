"""What a gunicorn worker must redo after it is forked from a master that preloaded the app."""

from __future__ import annotations

from flask import Flask


def after_fork(app: Flask) -> None:
    """Drop the MLflow connections inherited from the master; start this worker's model watcher and job sweeper.

    A socket or database connection shared by several processes mixes their traffic; each worker
    opens its own. Threads do not survive fork, so the watcher is started here, once per worker.
    """
    from mlflow.utils import request_utils

    request_utils._cached_get_request_session.cache_clear()
    for engine in _sql_engines():
        engine.dispose(close=False)  # new pool in this process; the master's connections stay its own
    store = app.extensions.get("model_store")
    if store is not None:
        warm_up(app, store)
        store.start_watcher()
    executor = app.extensions.get("train_executor")
    if hasattr(executor, "start_sweeper"):  # the local executor: start again jobs whose process died
        import os

        executor.start_sweeper(owner=os.getppid())  # the warm parent of jobs lives as long as the master


def _sql_engines() -> list:
    """MLflow's database engines in this process; none where SQLAlchemy is not installed (the compiled-only
    stack: mlflow-skinny talks to a tracking server over HTTP only)."""
    try:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSqlStore
    except ImportError:
        return []
    return [engine for store in (TrackingSqlStore, RegistrySqlStore) for engine in store._engine_map.values()]


def warm_up(app: Flask, store) -> None:
    """Do, before the first request, what would otherwise stall it: open this process's registry
    connection, catch up with the registry, and run one prediction end to end (the runtime's first
    call, the metric files of this process)."""
    import logging

    from kernel import metrics
    from serving.prediction import predict

    store.follow_registry()  # this worker's own MLflow connection, opened now rather than under load
    model = store.get()
    if model is None:
        return
    try:
        predict(model, model.example, 1)
    except Exception:  # a warm-up must never stop a worker from starting
        logging.getLogger(__name__).exception("warm-up prediction failed")
    metrics.warm_up(model.ref.name, model.ref.version)
