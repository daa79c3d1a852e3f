"""gunicorn's configuration for `make run` and `make serve`; every value can be set from the environment.

preload_app is True: the master builds the app and loads the active model once, and the workers share
those pages copy-on-write. Measured with scripts/measure_workers.py (4 workers, default model): total
PSS 371 MiB with preload against 954 MiB without, and ready in 4.5 s against 13.7 s. What does not
survive a fork is redone per worker in post_fork (service/forking.py): MLflow's HTTP sessions and
database pools are dropped, and each worker starts its own model watcher. A worker recycled by
max_requests forks from the master's copy and catches up through this machine's active-model pointer
before its first answer. GUNICORN_PRELOAD=false turns it off.
"""

import os
import tempfile

os.environ.setdefault("HOST", "127.0.0.1")  # the app's Host check (kernel/auth.py) needs the bind's address
from kernel.config import settings_or_exit  # noqa: E402

settings = settings_or_exit()  # an invalid setting stops gunicorn here, in one line, before anything forks
# Every value below comes from the checked settings (kernel/config.py), not from the raw environment.
bind = f"{settings.HOST or '127.0.0.1'}:{settings.PORT}"
workers = settings.WEB_CONCURRENCY
# gthread, with a fair share of connections between the workers and a stop that closes idle keep-alive ones
worker_class = "service.gunicorn_worker.ServingWorker"
threads = settings.GUNICORN_THREADS
preload_app = settings.GUNICORN_PRELOAD
if preload_app:
    os.environ["WATCH_REGISTRY"] = "false"  # the master does not watch; each worker does, after the fork
# A first start on an empty registry trains the default model inside one worker's start-up.
timeout = settings.GUNICORN_TIMEOUT
graceful_timeout = settings.GUNICORN_GRACEFUL_TIMEOUT
keepalive = 5
# gunicorn 26's control socket has one default path per user ($HOME/.gunicorn/gunicorn.ctl): every instance
# on a machine (two services, the tests' servers) would share it, and a command meant for one reaches
# another. Nothing here uses gunicornc; signals (HUP, TERM, TTIN/TTOU) work as ever.
control_socket_disable = True
# A recycle is a safety valve against slow leaks, not a routine: at a few thousand answers a second,
# 5000 meant a new worker every few seconds. `make soak` shows a worker's memory flat without it.
max_requests = settings.GUNICORN_MAX_REQUESTS
max_requests_jitter = settings.GUNICORN_MAX_REQUESTS_JITTER
accesslog = None  # the app logs one line per request itself, with model version and request id (kernel/logs.py)
logger_class = "service.gunicorn_logger.ServingLogger"  # and gunicorn does not build a line it would drop
errorlog = "-"
loglevel = settings.LOG_LEVEL

# One BLAS/OpenMP thread per worker: the workers are the parallelism; more threads only contend.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

# Prometheus counts from every worker add up in one folder (prometheus_client's multiprocess mode).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-")

# gunicorn's own lines in the app's format: JSON, or text with LOG_FORMAT=text. Imported after the
# variables above are set: importing the package loads numpy.
from kernel.logs import gunicorn_logconfig  # noqa: E402

_secrets = tuple(t.get_secret_value() for t in (settings.API_TOKEN, settings.PREDICT_TOKEN) if t is not None)
logconfig_dict = gunicorn_logconfig(settings.LOG_FORMAT, loglevel, _secrets)


def on_starting(server):
    for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
        os.unlink(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], name))


def when_ready(server):
    """On a terminal (`make run` in a shell), one short block: where the service is, what it serves, the token."""
    import sys

    from service.gunicorn_worker import mark_stops

    mark_stops(server)  # before the first fork: a worker that loses the master's SIGTERM in its fork still stops

    if settings.LOG_FORMAT != "text" or not sys.stderr.isatty() or not server.cfg.preload_app:
        return
    import json

    app = server.app.wsgi()
    url = f"http://{'127.0.0.1' if settings.HOST in (None, '0.0.0.0') else settings.HOST}:{settings.PORT}"
    store = app.extensions.get("model_store")
    model = store.get() if store is not None else None
    lines = [f"Model serving is up at {url}  (interactive docs: {url}/docs)"]
    if model is not None:
        lines.append(f"Serving {model.ref.name} version {model.ref.version} ({model.runtime}). Try:")
        lines.append(
            f"  curl -X POST {url}/predict -H 'Content-Type: application/json' -d '{json.dumps(model.example)}'"
        )
    if settings.API_AUTH:
        lines.append("/train, /use-model and /rollout need the API token: `make token` prints it.")
    print("\n" + "\n".join(lines) + "\n", file=sys.stderr, flush=True)


def pre_fork(server, worker):
    # Everything the master built (modules, the app, the model) moves to the GC's permanent generation:
    # a worker's collections then never walk those objects, which would stall its first requests and
    # copy the pages it shares with the master.
    import gc

    gc.collect()
    gc.freeze()


def post_fork(server, worker):
    from service.gunicorn_worker import stop_promptly_while_booting

    stop_promptly_while_booting(server)  # a SIGTERM during the warm-up below must not be lost
    if server.cfg.preload_app:
        from service.forking import after_fork

        after_fork(server.app.wsgi())


def child_exit(server, worker):
    from prometheus_client import multiprocess

    from service.gunicorn_worker import release_worker

    multiprocess.mark_process_dead(worker.pid)
    release_worker(worker.pid)  # its slot in the workers' connection table, however it died


def worker_exit(server, worker):
    # A worker leaves without Python's finalisation: ONNX Runtime, loaded by the master before the fork,
    # hangs or aborts when its globals are torn down in a forked child (microsoft/onnxruntime#31961).
    # The worker has finished its requests by now; only flushing is left (the app's exit hooks: the
    # prediction log's queue), and the exit code is kept.
    import logging
    import sys

    error = sys.exc_info()[1]
    try:
        hooks = server.app.wsgi().extensions.get("exit_hooks", [])
    except Exception:  # the app never loaded in this worker: nothing of it to flush
        hooks = []
    for hook in hooks:
        try:
            hook()
        except Exception:
            logging.getLogger(__name__).exception("an exit hook failed")
    code = error.code if isinstance(error, SystemExit) else (1 if error else 0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
