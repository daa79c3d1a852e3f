"""Write the bytecode a first start needs later, beside that start: `make install` runs it in the background.

`make install` leaves the 17,000 modules of the .venv uncompiled (compiling them all costs a first `make run` 16 s;
see the Makefile). The first start then compiles what it imports, on one core: MLflow and pandas in the gunicorn
master first, then MLflow's schema migrations for a new store, then scikit-learn, skl2onnx, skops and matplotlib for
the default model. This process compiles the later ones on the other core meanwhile, in the order the start needs
them, so the master finds their .pyc files written. It imports nothing of the project's own but the training code;
besides the .pyc files it writes only what those imports write (matplotlib's font cache, as the first start's plots
would). A second start finds everything compiled and this has nothing to do. `make install` stops it after 300 s at
most, and its output is in `.venv/warm-bytecode.log`.
"""

from __future__ import annotations

import compileall
import importlib
import importlib.util
import os
import sys
from pathlib import Path

sys.dont_write_bytecode = False  # make clears PYTHONDONTWRITEBYTECODE for it, but a caller might not
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# In the order the default model's training reaches them: scikit-learn's estimators and MLflow's fluent API, then
# the compiled form, the registration and the plots.
MODULES = (
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "training.run",
    "skl2onnx",
    "onnxruntime",
    "training.compile",
    "mlflow.sklearn",
    "skops.io",
    "training.plots",
)


def main() -> None:
    for package in ("mlflow.store", "alembic"):  # a new store's schema migrations come first
        compileall.compile_dir(Path(importlib.util.find_spec(package).origin).parent, quiet=2)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in MODULES:
        importlib.import_module(name)


if __name__ == "__main__":
    main()
