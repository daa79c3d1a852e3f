"""A version's drift baseline, built from its training rows at registration (`extra_files/baseline.json`).

What the served inputs are compared with: per feature, the training rows' distribution in the cells of
`kernel.drift_format` (deciles for numbers, the most frequent values for text, true/false for booleans,
with missing counted apart), and the labels the model predicted on the hold-out rows. Counts, not
fractions, so smoothing and noise are exact. Only distributions: no training row is stored.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from kernel.drift_format import (
    BASELINE_SCHEMA,
    MAX_TEXT_VALUES,
    number_bins,
    number_edges,
    text_key,
)


def feature_kind(column: pd.Series) -> str:
    """number, boolean or text, as the version's signature (and so the served row schema) reads the column."""
    if pd.api.types.is_bool_dtype(column):
        return "boolean"
    if pd.api.types.is_numeric_dtype(column):
        return "number"
    return "text"


def _number(column: pd.Series) -> dict:
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    edges = number_edges(values)
    bins = number_bins(values, edges)
    present = values[~np.isnan(values)]
    counts = np.bincount(bins[bins >= 0], minlength=len(edges) + 1)
    return {
        "kind": "number",
        "edges": edges,
        "counts": [int(c) for c in counts],
        "missing": int((bins < 0).sum()),
        "min": float(present.min()) if present.size else None,
        "max": float(present.max()) if present.size else None,
    }


def _keyed(column: pd.Series, kind: str) -> dict:
    # Counted by distinct value first, then keyed: text_key once per distinct value, not per row. A column of
    # one type is counted by pandas; a mixed one with the type as part of the value, so 1, 1.0 and True stay
    # apart as text_key keeps them.
    if pd.api.types.infer_dtype(column, skipna=True) in ("string", "boolean"):
        distinct = column.value_counts(dropna=False).items()
    else:
        values = column.tolist()
        distinct = ((value, count) for (_, value), count in Counter(zip(map(type, values), values)).items())
    keys: Counter = Counter()
    for value, count in distinct:
        keys[text_key(value)] += int(count)
    missing = keys.pop(None, 0)
    if kind == "boolean":
        return {"kind": kind, "values": {k: keys.get(k, 0) for k in ("true", "false")}, "missing": missing}
    top = dict(keys.most_common(MAX_TEXT_VALUES))
    return {"kind": kind, "values": top, "other": sum(keys.values()) - sum(top.values()), "missing": missing}


def build_baseline(features: pd.DataFrame, holdout_predictions, classes) -> dict:
    """The baseline document of a version trained on `features`, predicting `holdout_predictions` on its hold-out."""
    described = {}
    for name in features.columns:
        column = features[name]
        kind = feature_kind(column)
        described[str(name)] = _number(column) if kind == "number" else _keyed(column, kind)
    predicted = Counter(str(label) for label in holdout_predictions)
    return {
        "schema": BASELINE_SCHEMA,
        "rows": len(features),
        "holdout_rows": int(sum(predicted.values())),
        "features": described,
        "prediction": {"classes": {str(label): predicted.get(str(label), 0) for label in classes}},
    }


def baseline_bytes(features: pd.DataFrame, holdout_predictions, classes) -> bytes:
    """build_baseline as the compact JSON registered with the version."""
    document = build_baseline(features, holdout_predictions, classes)
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
