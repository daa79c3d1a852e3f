"""What a gunicorn worker must redo after it is forked from a master that preloaded the app."""

from __future__ import annotations

from flask import Flask


def after_fork(app: Flask) -> None:
    """Drop the MLflow connections inherited from the master and start this worker's model watcher.

    A socket or database connection shared by several processes mixes their traffic; each worker
    opens its own. Threads do not survive fork, so the watcher is started here, once per worker.
    """
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySqlStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSqlStore
    from mlflow.utils import request_utils

    request_utils._cached_get_request_session.cache_clear()
    for store_class in (TrackingSqlStore, RegistrySqlStore):
        for engine in store_class._engine_map.values():
            engine.dispose(close=False)  # new pool in this process; the master's connections stay its own
    store = app.extensions.get("model_store")
    if store is not None:
        store.start_watcher()
