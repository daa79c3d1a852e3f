"""The compiled-model format: a version's ONNX form and its verdict file, and the rules both runtimes share.

One module owns the format, so the side that writes it (training's registration) and the side that
reads it (serving's loaded model) cannot drift apart:
- the files beside the model (`extra_files/compiled.json`, `extra_files/model.onnx`);
- the verdict: which runtime serves the version and why, its classes, and scikit-learn's answers on
  the input example (the service checks the ONNX form against them before it serves it);
- the feed rule: one (n, 1) input per column, numbers as float32, text as strings with "" for missing;
- the output name, the tie rule, the float32 limit and the runtime reasons.

numpy only: the compiled-only Lambda package has no pandas or scikit-learn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

EXTRA_FILES = "extra_files"  # MLflow's folder for a logged model's extra files
COMPILED_FILE = "compiled.json"
ONNX_FILE = "model.onnx"
# skl2onnx's name for the probabilities tensor, with zipmap off (one row per sample, in classes_ order).
PROBABILITY_OUTPUT = "probabilities"
# ONNX strings cannot be missing: the compiled form's text imputers read this as missing.
MISSING_TEXT = ""
# The largest number the runtimes hold: the ONNX forms take float32, as scikit-learn's trees do inside.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# ONNX forms compute in float32: a tie in scikit-learn's float64 probabilities (7 trees of 15 for each of
# two classes) arrives as two values a few 1e-8 apart. Within this margin the first class wins, as
# scikit-learn's argmax picks the first of equal values.
TIE_MARGIN = 1e-6

RUNTIMES = ("onnx", "sklearn")
# The batch forms of a prediction body: ours ("records") and those of MLflow's scoring server. A feature
# cannot take one of these names (a one-row body would read as a batch).
BATCH_KEYS = ("records", "dataframe_records", "dataframe_split", "instances", "inputs")
# Why scikit-learn serves a version, where the version itself does not say.
REASON_FORCED = "SERVING_RUNTIME=sklearn forces scikit-learn"
REASON_NO_FORM = "registered before compiled inference; no ONNX form"
REASON_UNREADABLE = f"{COMPILED_FILE} is not readable"
REASON_ONNX_MISSING = f"marked compiled but its {ONNX_FILE} is missing"


def label_indices(probabilities: np.ndarray, compiled: bool) -> np.ndarray:
    """The most probable class per row; for a compiled form, the first of those within TIE_MARGIN of the top."""
    if not compiled:
        return probabilities.argmax(axis=1)
    return (probabilities >= probabilities.max(axis=1, keepdims=True) - TIE_MARGIN).argmax(axis=1)


def first_top_index(row: Sequence[float], compiled: bool) -> int:
    """label_indices for one row of plain floats (a few rows are faster without numpy's call setup)."""
    top = max(row) - (TIE_MARGIN if compiled else 0.0)
    return next(i for i, p in enumerate(row) if p >= top)


def _text(value) -> str:
    return MISSING_TEXT if value is None or value != value else str(value)  # None or NaN: missing


def onnx_feeds(numbers: Mapping[str, Iterable], texts: Mapping[str, Iterable]) -> dict[str, np.ndarray]:
    """The inputs of a compiled form: one (n, 1) array per column, numbers float32 (None: NaN), text as strings.

    Every number column goes into one float32 matrix, and each input is a contiguous view of one of its rows.
    """
    feeds = {}
    if numbers:
        matrix = np.array(list(numbers.values()), dtype=np.float32)
        feeds = {name: matrix[i].reshape(-1, 1) for i, name in enumerate(numbers)}
    for name, values in texts.items():
        feeds[name] = np.array([_text(v) for v in values], dtype=object).reshape(-1, 1)
    return feeds


def write_verdict(folder: Path, runtime: str, reason: str, classes: list, example_probabilities=None) -> Path:
    """Write compiled.json into `folder`: the runtime and reason, the classes, and (compiled) sklearn's example answers."""
    verdict = {"runtime": runtime, "reason": reason, "classes": classes}
    if example_probabilities is not None:
        verdict["example_probabilities"] = example_probabilities
    path = Path(folder) / COMPILED_FILE
    path.write_text(json.dumps(verdict))
    return path


def read_verdict(model_dir: Path) -> dict | None:
    """A downloaded version's compiled.json, or None when it is missing or not a JSON object."""
    try:
        verdict = json.loads((Path(model_dir) / EXTRA_FILES / COMPILED_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


def compiled_form(model_dir: Path, verdict: dict | None, serving_runtime: str) -> tuple[bytes | None, str]:
    """The verified ONNX bytes of a downloaded version, if it has them and SERVING_RUNTIME allows, and why (not)."""
    folder = Path(model_dir) / EXTRA_FILES
    if serving_runtime == "sklearn":
        return None, REASON_FORCED
    if not (folder / COMPILED_FILE).exists():
        return None, REASON_NO_FORM
    if verdict is None:
        return None, REASON_UNREADABLE
    if verdict.get("runtime") != "onnx":
        return None, str(verdict.get("reason", "not compiled"))
    try:
        return (folder / ONNX_FILE).read_bytes(), str(verdict.get("reason", "compiled"))
    except FileNotFoundError:
        return None, REASON_ONNX_MISSING


def runtime_of(tags: dict, serving_runtime: str = "auto") -> dict:
    """Which runtime serves a registered version, and why, from its tags (what `/models` shows)."""
    if serving_runtime == "sklearn":
        return {"runtime": "sklearn", "runtime_reason": REASON_FORCED}
    if tags.get("runtime") not in RUNTIMES:
        return {"runtime": "sklearn", "runtime_reason": REASON_NO_FORM}
    return {"runtime": tags["runtime"], "runtime_reason": tags.get("runtime_reason", "")}
