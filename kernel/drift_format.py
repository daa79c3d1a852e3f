"""The drift baseline's format: the file registered with each version, its cells, and the binning rule.

One module owns it, so the side that writes a baseline (training's registration, from the training rows)
and the side that counts live rows against it (serving's drift counter) put a value in the same cell:
- numbers: bins cut at the training rows' deciles (equal edges merge), edges stored as float32 values so
  the compiled path's float32 arrays fall as they did at training; a value v lands in bin
  `count(edges <= v)`; then one cell for missing, and two flag cells (below the training minimum, above the
  maximum) that count rows out of range and take no part in the distances;
- text: the most frequent training values, then `other`, then `missing`;
- booleans: true, false, missing;
- the prediction: one cell per class, in the order the baseline lists them.

numpy only: the compiled-only Lambda package has no pandas or scikit-learn.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernel.model_format import EXTRA_FILES

BASELINE_FILE = "baseline.json"
BASELINE_SCHEMA = 1
BASELINE_TAG = "drift.baseline_sha256"  # on the version: the sha256 of its baseline.json
BASELINE_ERROR_TAG = "drift.baseline_error"  # on the version: why it has no baseline
MAX_TEXT_VALUES = 50
DECILES = tuple(q / 10 for q in range(1, 10))
KINDS = ("number", "text", "boolean")
BOOLEAN_KEYS = ("true", "false")


def number_edges(values: np.ndarray) -> list[float]:
    """The deciles of the present values (values that occur), as float32, equal ones merged (few values: few bins)."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return []
    deciles = np.quantile(present.astype(np.float64), DECILES, method="inverted_cdf").astype(np.float32)
    return [float(edge) for edge in np.unique(deciles)]


def number_bins(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Each value's bin: how many edges are <= it (NaN: -1, for the caller's missing cell)."""
    values = np.asarray(values, dtype=np.float32)
    bins = np.searchsorted(np.asarray(edges, dtype=np.float32), values, side="right").astype(np.int64)
    bins[np.isnan(values)] = -1
    return bins


def text_key(value) -> str | None:
    """A text or boolean value as the baseline keys it; None for missing."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class FeatureCells:
    """Where one feature's cells sit in a version's count vector, and its reference counts."""

    name: str
    kind: str
    offset: int
    size: int  # cells in the distribution: bins (or values and other) and missing
    reference: np.ndarray  # int64 counts of the training rows, one per distribution cell
    edges: np.ndarray | None = None  # numbers: float32 edges
    values: dict = field(default_factory=dict)  # text and booleans: key -> cell index within the feature
    low: float = float("nan")  # numbers: the training minimum and maximum
    high: float = float("nan")
    # The same, as the plain floats a few rows are compared with (float32 values, as the arrays hold them).
    edge_list: list = field(default_factory=list)
    low32: float = float("nan")
    high32: float = float("nan")


@dataclass(frozen=True)
class Baseline:
    """A version's baseline as arrays: the cells of every feature and of the prediction, and their references."""

    sha256: str
    rows: int
    holdout_rows: int
    features: tuple[FeatureCells, ...]
    classes: tuple[str, ...]
    prediction_offset: int
    prediction_reference: np.ndarray
    cells: int  # the length of one count vector: every feature's cells, the flag cells, the prediction
    class_cells: dict = field(default_factory=dict)  # a predicted label (as text) -> its cell

    def feature(self, name: str) -> FeatureCells:
        return next(cells for cells in self.features if cells.name == name)


def _number_cells(name: str, spec: Mapping, offset: int) -> FeatureCells:
    edges = np.asarray(spec["edges"], dtype=np.float32)
    counts = [int(c) for c in spec["counts"]]
    if len(counts) != edges.size + 1:
        raise ValueError(f"feature {name!r}: {edges.size} edges need {edges.size + 1} counts, not {len(counts)}")
    low = float("nan") if spec.get("min") is None else float(spec["min"])
    high = float("nan") if spec.get("max") is None else float(spec["max"])
    reference = np.asarray([*counts, int(spec["missing"])], dtype=np.int64)
    return FeatureCells(name, "number", offset, reference.size, reference, edges=edges, low=low, high=high,
                        edge_list=edges.tolist(), low32=float(np.float32(low)), high32=float(np.float32(high)))  # fmt: skip


def _keyed_cells(name: str, kind: str, spec: Mapping, offset: int) -> FeatureCells:
    keys = list(BOOLEAN_KEYS) if kind == "boolean" else list(spec["values"])
    counts = [int(spec["values"].get(key, 0)) for key in keys]
    counts += [] if kind == "boolean" else [int(spec.get("other", 0))]
    reference = np.asarray([*counts, int(spec["missing"])], dtype=np.int64)
    return FeatureCells(name, kind, offset, reference.size, reference, values={k: i for i, k in enumerate(keys)})


def parse_baseline(text: str | bytes) -> Baseline:
    """A baseline.json's content as arrays; ValueError (or KeyError, TypeError) when it is not one."""
    raw = text.encode() if isinstance(text, str) else text
    document = json.loads(raw)
    if not isinstance(document, dict) or document.get("schema") != BASELINE_SCHEMA:
        raise ValueError(f"not a schema {BASELINE_SCHEMA} baseline")
    features, offset = [], 0
    for name, spec in document["features"].items():
        kind = spec["kind"]
        if kind not in KINDS:
            raise ValueError(f"feature {name!r}: unknown kind {kind!r}")
        cells = _number_cells(name, spec, offset) if kind == "number" else _keyed_cells(name, kind, spec, offset)
        features.append(cells)
        offset += cells.size + (2 if kind == "number" else 0)  # numbers: two flag cells after the distribution
    classes = tuple(str(label) for label in document["prediction"]["classes"])
    reference = np.asarray([int(c) for c in document["prediction"]["classes"].values()], dtype=np.int64)
    return Baseline(
        sha256=hashlib.sha256(raw).hexdigest(),
        rows=int(document["rows"]),
        holdout_rows=int(document["holdout_rows"]),
        features=tuple(features),
        classes=classes,
        prediction_offset=offset,
        prediction_reference=reference,
        cells=offset + len(classes),
        class_cells={label: offset + i for i, label in enumerate(classes)},
    )


def read_baseline(model_dir: Path) -> tuple[Baseline | None, str]:
    """A downloaded version's baseline, or None and why not (predictions never depend on it)."""
    path = Path(model_dir) / EXTRA_FILES / BASELINE_FILE
    try:
        return parse_baseline(path.read_bytes()), "ok"
    except FileNotFoundError:
        return None, "this version was registered without a drift baseline"
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return None, f"{BASELINE_FILE} is not readable: {error}"
