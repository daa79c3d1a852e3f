"""gunicorn's configuration for `make run` and `make serve`; every value can be set from the environment.

preload_app is False: each worker builds the app and loads the model itself, after the fork. The
model watcher thread and MLflow's HTTP sessions do not survive a fork, and a worker that loads its
own model can be recycled (max_requests) without the master holding a stale copy. The price is
memory per worker: measured in the README ("Running in production").
"""

import os
import tempfile

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
preload_app = False
# A first start on an empty registry trains the default model inside one worker's start-up.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "5000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "500"))
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")

# One BLAS/OpenMP thread per worker: the workers are the parallelism; more threads only contend.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

# Prometheus counts from every worker add up in one folder (prometheus_client's multiprocess mode).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")


def on_starting(server):
    for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
        os.unlink(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
