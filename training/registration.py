"""Registration: a fitted pipeline logged to MLflow in skops format, with its compiled form, as a new version."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.utils import clean_tensor_type

from kernel.drift_format import BASELINE_ERROR_TAG, BASELINE_FILE, BASELINE_TAG
from kernel.model_format import ONNX_FILE, write_verdict
from kernel.registry import ModelRef, translate_errors
from kernel.trusted_types import TRUSTED_TYPES
from training.baseline import baseline_bytes
from training.compile import compile_pipeline

log = logging.getLogger(__name__)


def _pinned_requirements() -> list[str]:
    """The packages a registered model needs to load, at the versions it was trained with."""
    from importlib.metadata import version

    packages = ("mlflow", "scikit-learn", "skops", "numpy", "scipy", "pandas")
    return [f"{package}=={version(package)}" for package in packages]


def signature_of(features: pd.DataFrame, classes) -> ModelSignature:
    """The version's signature from the validated columns, as MLflow's `infer_signature` would write it, without
    inferring: each column is float64 (a double) or text (a string), required unless a training row lacks it; the
    output is a label of the classes' type. Other columns (never made by training/datasets.py) are inferred."""
    columns = []
    for name in features.columns:
        values = features[name]
        if pd.api.types.is_float_dtype(values.dtype):
            kind = DataType.double
        elif values.dtype == object and values.map(lambda value: isinstance(value, str) or pd.isna(value)).all():
            kind = DataType.string
        else:
            return infer_signature(features, np.asarray(classes))
        columns.append(ColSpec(kind, str(name), required=not values.isna().any()))
    labels = clean_tensor_type(np.asarray(classes).dtype)  # '<U9' -> str, as MLflow writes it
    return ModelSignature(Schema(columns), Schema([TensorSpec(labels, (-1,))]))


def log_model_version(
    model,
    features,
    model_name: str,
    tags: dict,
    metrics: dict,
    holdout=None,
) -> ModelRef:
    """Log a fitted pipeline to the active run in skops format and register it as a new version.

    Called inside `mlflow.start_run(...)` by the training job. The signature (feature names and
    types) comes from the validated columns (`signature_of`), the input example is their first rows, and the
    pip requirements are the pinned ones: MLflow infers none of them. The class labels are the model's own.
    The version's model folder also holds its compiled form (`extra_files/model.onnx`) when that
    agrees with scikit-learn on the hold-out and training rows, and `extra_files/compiled.json`
    saying which runtime serves it and why, with scikit-learn's answers on the input example (the
    service checks the ONNX form against them before serving it, without loading scikit-learn).
    MLflow clients still load the scikit-learn model.
    """
    signature = signature_of(features, model.classes_)
    compiled = compile_pipeline(model, features, features.head(0) if holdout is None else holdout)
    example = features.head(3)
    with tempfile.TemporaryDirectory() as folder:
        # The service checks the ONNX form against scikit-learn's answers on the example before it serves it.
        answers = model.predict_proba(example).tolist() if compiled.onnx is not None else None
        extra_files = [
            str(write_verdict(Path(folder), compiled.runtime, compiled.reason, model.classes_.tolist(), answers))
        ]
        if compiled.onnx is not None:
            (Path(folder) / ONNX_FILE).write_bytes(compiled.onnx)
            extra_files.append(str(Path(folder) / ONNX_FILE))
        drift_tags = _write_baseline(Path(folder), model, features, holdout)
        if BASELINE_TAG in drift_tags:
            extra_files.append(str(Path(folder) / BASELINE_FILE))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            serialization_format="skops",
            skops_trusted_types=TRUSTED_TYPES,
            signature=signature,
            input_example=example,
            # Stated, not inferred: inference starts a Python subprocess and costs seconds per job.
            pip_requirements=_pinned_requirements(),
            extra_files=extra_files,
        )
    mlflow.set_tags({"runtime": compiled.runtime, "runtime_reason": compiled.reason})
    version_tags = {**tags, "metrics": json.dumps(metrics), "runtime": compiled.runtime,
                    "runtime_reason": compiled.reason, **drift_tags}  # fmt: skip
    created = translate_errors(mlflow.register_model)(info.model_uri, model_name, tags=version_tags)
    return ModelRef(created.name, str(created.version))


def _write_baseline(folder: Path, model, features, holdout) -> dict:
    """Write the drift baseline beside the model; its tags (the sha256, or why there is none). Never fails."""
    try:
        rows = features.head(0) if holdout is None else holdout
        predicted = model.predict(rows).tolist() if len(rows) else []
        content = baseline_bytes(features, predicted, model.classes_.tolist())
        (folder / BASELINE_FILE).write_bytes(content)
        return {BASELINE_TAG: hashlib.sha256(content).hexdigest()}
    except Exception as exc:  # like compile_pipeline: a baseline never fails a registration
        log.warning("no drift baseline for this version: %s", exc)
        return {BASELINE_ERROR_TAG: f"{type(exc).__name__}: {exc}"[:500]}
