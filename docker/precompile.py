"""Write the bytecode of what a start imports, at build time (Dockerfile): run from /app in the image.

A read-only root filesystem cannot take .pyc files at start, and without them every start compiles
again (seconds for MLflow alone). Compiling the whole virtualenv would add ~65 MB of .pyc to the inference
image; importing every module of the project's packages (and what gunicorn, ONNX Runtime and MLflow's
client stores load) compiles exactly the modules they reach, and nothing else.
"""

from __future__ import annotations

import compileall
import importlib
import pkgutil
import sys

sys.dont_write_bytecode = False  # PYTHONDONTWRITEBYTECODE=1 is the image's setting for run time
sys.path.insert(0, "/app")
PACKAGES = ("kernel", "service", "serving", "training")
# The prediction log's packages, not in the inference image (PREDICTION_LOG=off there): its modules are skipped.
OPTIONAL = ("sqlalchemy", "alembic")
EXTRA = (
    "gunicorn.app.wsgiapp",
    "gunicorn.workers.gthread",
    "gunicorn.glogging",
    "gunicorn.instrument.statsd",
    "onnxruntime",
    "mlflow.tracking",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.model_registry.rest_store",
    "mlflow.store.artifact.artifact_repository_registry",
    "mlflow.store.artifact.http_artifact_repo",
    "mlflow.store.artifact.mlflow_artifacts_repo",
    "mlflow.store.artifact.s3_artifact_repo",
    "mlflow.store.artifact.local_artifact_repo",
    "boto3",
)


def main() -> None:
    compileall.compile_dir("/app", quiet=1)
    for name in PACKAGES:
        try:
            package = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # training/ is not in the inference image
                continue
            raise
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            if name == "training" and info.name.endswith("__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if exc.name not in OPTIONAL:
                    raise  # compile_dir above has still written its bytecode
    for name in EXTRA:
        importlib.import_module(name)
    print(f"precompile: {len(sys.modules)} modules imported and compiled")


if __name__ == "__main__":
    main()
