"""Rows to the arrays a runtime takes: validated columns, ONNX Runtime's feeds, scikit-learn's DataFrame.

Valid rows go from the parsed JSON straight into the arrays the runtime takes: one (n, 1) array per
column for ONNX Runtime, a DataFrame only when scikit-learn serves the version. The bottom of the
inference half: it knows features and columns, not loaded models' files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kernel.model_format import FLOAT32_MAX, PROBABILITY_OUTPUT, onnx_feeds

# Up to this many rows, plain Python checks and labels are faster than numpy's per-call setup.
SMALL_BATCH = 32
KIND_TYPES = {"number": (int, float), "text": (str,), "boolean": (bool,)}


@dataclass(frozen=True)
class Feature:
    """One input column as the model's MLflow signature declares it."""

    name: str
    kind: str  # "number", "text" or "boolean"
    required: bool  # False when the training data had missing values: null is then accepted

    @functools.cached_property
    def allowed_types(self) -> frozenset:
        """The JSON value types (exact Python types) this feature accepts."""
        return frozenset(KIND_TYPES[self.kind] + (() if self.required else (type(None),)))


def within_float32(values: list) -> bool:
    """Every value is a number a 32-bit float holds (NaN and Infinity fail the comparison)."""
    if len(values) <= SMALL_BATCH:
        # Python compares any int with a float exactly: 10**400 fails here without an OverflowError.
        return all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in values)
    try:
        array = np.array(values, dtype="float64")
    except OverflowError:
        return False  # an integer too large for a float: the schema says "Number too large."
    return bool(np.abs(array).max() <= FLOAT32_MAX)


def fast_columns(model, rows: list) -> dict | None:
    """The rows as one list of values per feature when every row is valid, checked a column at a time.

    None if any row is not valid. Accepts exactly what the marshmallow schema accepts
    (tests/test_validation.py checks both agree); the schema then only runs on failing bodies, to
    say what is wrong. None stands for a missing value where the training data had gaps.
    """
    expected = model.feature_set
    for row in rows:
        if type(row) is not dict or row.keys() != expected:
            return None
    columns = {}
    for feature in model.features:
        name = feature.name
        values = [row[name] for row in rows]
        if not set(map(type, values)) <= feature.allowed_types:  # exact types: a bool is not a number
            return None
        if feature.kind == "number":
            present = values if feature.required else [v for v in values if v is not None]
            if present and not within_float32(present):
                return None
        columns[name] = values
    return columns


def onnx_probabilities(model, columns: dict) -> np.ndarray:
    """The compiled form's class probabilities for valid columns (the feed rule is the format's)."""
    numbers = {name: columns[name] for name in model.number_features}
    texts = {name: columns[name] for name in model.text_features}
    return model.session.run([PROBABILITY_OUTPUT], onnx_feeds(numbers, texts))[0]


def sklearn_frame(model, columns: dict):
    """Valid columns as the DataFrame scikit-learn's pipeline takes (missing text as NaN)."""
    import pandas as pd

    frame = {}
    for feature in model.features:
        values = columns[feature.name]
        if feature.kind == "number":
            frame[feature.name] = np.array(values, dtype="float64")
        elif feature.kind == "text":
            frame[feature.name] = np.array([np.nan if v is None else v for v in values], dtype=object)
        else:
            frame[feature.name] = np.array(values, dtype=bool)
    return pd.DataFrame(frame, columns=model.feature_names)
