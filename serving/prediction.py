"""Prediction as a plain function: request body in, answer out; the view only adapts HTTP.

Valid rows go from the parsed JSON straight into the arrays the runtime takes: one (n, 1) array per
column for ONNX Runtime, a DataFrame only when scikit-learn serves the version.
"""

from __future__ import annotations

import functools

import numpy as np
from marshmallow import ValidationError

from serving.loaded_model import FLOAT32_MAX, LoadedModel

# The batch forms: ours ("records") and those of MLflow's scoring server.
BATCH_KEYS = ("records", "dataframe_records", "dataframe_split", "instances", "inputs")
MAX_REPORTED_ROWS = 20
# Up to this many rows, plain Python checks and labels are faster than numpy's per-call setup.
SMALL_BATCH = 32
# ONNX forms compute in float32: a tie in scikit-learn's float64 probabilities (7 trees of 15 for each of
# two classes) arrives as two values a few 1e-8 apart. Within this margin the first class wins, as
# scikit-learn's argmax picks the first of equal values.
TIE_MARGIN = 1e-6


def label_indices(probabilities: np.ndarray, compiled: bool) -> np.ndarray:
    """The most probable class per row; for a compiled form, the first of those within TIE_MARGIN of the top."""
    if not compiled:
        return probabilities.argmax(axis=1)
    return (probabilities >= probabilities.max(axis=1, keepdims=True) - TIE_MARGIN).argmax(axis=1)


def _labels(model: LoadedModel, probabilities: np.ndarray, rows: list[list[float]] | None, compiled: bool) -> list:
    """Each row's label, as label_indices picks it (in plain Python for a few rows: no numpy call setup)."""
    if rows is None or len(rows) > SMALL_BATCH:
        return model.class_array[label_indices(probabilities, compiled)].tolist()
    margin = TIE_MARGIN if compiled else 0.0
    labels = []
    for row in rows:
        top = max(row) - margin
        labels.append(model.classes[next(i for i, p in enumerate(row) if p >= top)])
    return labels


class BadInput(Exception):
    """The body cannot be predicted on; `errors` says what is wrong, per field or per row."""

    def __init__(self, errors: dict, message: str = "The request body does not match the model's features."):
        super().__init__(message)
        self.errors = errors
        self.message = message


def _rows_from_lists(rows: list, columns: list[str], where: str) -> list:
    """Positional rows (lists) to objects, in the given column order."""
    objects = []
    for index, row in enumerate(rows):
        if not isinstance(row, list):
            raise BadInput({where: [f"row {index} is not a list"]})
        if len(row) != len(columns):
            raise BadInput({where: [f"row {index} has {len(row)} values; expected {len(columns)}: {columns}"]})
        objects.append(dict(zip(columns, row)))
    return objects


def parse_rows(body, feature_names: list[str]) -> tuple[list, str | None]:
    """The rows of a body in any accepted form, and the batch key the client used (None: one row)."""
    if not isinstance(body, dict):
        raise BadInput({"body": ['a JSON object: one row {feature: value, ...} or {"records": [...]}']})
    batch_keys = [key for key in BATCH_KEYS if key in body]
    if not batch_keys:
        return [body], None
    if len(body) != 1:
        extra = sorted(set(body) - {batch_keys[0]})
        raise BadInput({key: ["Unknown field."] for key in extra})
    key = batch_keys[0]
    value = body[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise BadInput({key: ["an object with 'columns' and 'data' (a list of rows)"]})
        columns = value.get("columns", feature_names)
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise BadInput({key: ["'columns' must be a list of feature names"]})
        rows = _rows_from_lists(value["data"], columns, key)
    elif key == "inputs" and isinstance(value, dict):
        columns = list(value)
        if not all(isinstance(v, list) for v in value.values()) or len({len(v) for v in value.values()}) > 1:
            raise BadInput({key: ["columnar inputs need a list per feature, all of one length"]})
        rows = [dict(zip(columns, values)) for values in zip(*value.values())]
    elif isinstance(value, list):
        rows = value
        if key in ("instances", "inputs") and rows and all(isinstance(r, list) for r in rows):
            rows = _rows_from_lists(rows, feature_names, key)
    else:
        raise BadInput({key: ["a list of rows"]})
    if not rows:
        raise BadInput({key: ["the batch is empty; send at least one row"]})
    return rows, key


def _within_float32(values: list) -> bool:
    """Every value is a number a 32-bit float holds (NaN and Infinity fail the comparison)."""
    if len(values) <= SMALL_BATCH:
        # Python compares any int with a float exactly: 10**400 fails here without an OverflowError.
        return all(-FLOAT32_MAX <= v <= FLOAT32_MAX for v in values)
    try:
        array = np.array(values, dtype="float64")
    except OverflowError:
        return False  # an integer too large for a float: the schema says "Number too large."
    return bool(np.abs(array).max() <= FLOAT32_MAX)


def fast_columns(model: LoadedModel, rows: list) -> dict | None:
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
            if present and not _within_float32(present):
                return None
        columns[name] = values
    return columns


def row_errors(model: LoadedModel, rows: list, key: str | None) -> dict:
    """What is wrong, per field (one row) or per row index (a batch), from the marshmallow schema."""
    errors = {}
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValidationError({"_row": ["each row must be an object {feature: value, ...}"]})
            model.schema.load(row)
        except ValidationError as exc:
            if key is None:
                return exc.messages
            errors[str(index)] = exc.messages
            if len(errors) >= MAX_REPORTED_ROWS:
                break
    return errors


def validate_rows(model: LoadedModel, rows: list, key: str | None, max_rows: int) -> dict:
    """The rows as one array per feature, or BadInput saying what is wrong under the client's own key."""
    if len(rows) > max_rows:
        raise BadInput({key or "body": [f"{len(rows)} rows; at most {max_rows} per request"]})
    columns = fast_columns(model, rows)
    if columns is None:
        errors = row_errors(model, rows, key)
        if not errors:  # both validators must agree; if they do not, refuse rather than guess
            errors = {"body": ["the rows do not match the model's features"]}
        raise BadInput(errors if key is None else {key: errors})
    return columns


def _onnx_probabilities(model: LoadedModel, columns: dict) -> np.ndarray:
    numbers = model.number_features
    # One array for every number column (None, a missing value, becomes NaN, which the compiled imputer
    # fills); each input is a contiguous (n, 1) view of one of its rows.
    matrix = np.array([columns[name] for name in numbers], dtype=np.float32) if numbers else None
    feeds = {name: matrix[i].reshape(-1, 1) for i, name in enumerate(numbers)}
    for name in model.text_features:  # ONNX strings cannot be missing: the compiled form reads "" as missing
        feeds[name] = np.array(["" if v is None else v for v in columns[name]], dtype=object).reshape(-1, 1)
    return model.session.run(model.onnx_probability_output, feeds)[0]


def _sklearn_frame(model: LoadedModel, columns: dict):
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


def probabilities_of(model: LoadedModel, columns: dict, key: str | None) -> tuple[np.ndarray, bool]:
    """Class probabilities per row, and whether ONNX Runtime computed them (the version is compiled).

    A row that overflows 32-bit arithmetic (an extreme but finite value) is scored again by
    scikit-learn in 64 bits; a row no runtime can score is a 400, never a NaN in the answer.
    """
    if model.session is not None:
        probabilities = _onnx_probabilities(model, columns)
        if np.isfinite(probabilities).all():
            return probabilities, True
        if model.estimator is None:
            return _finite_or_bad(probabilities, key), True
    return _finite_or_bad(model.estimator.predict_proba(_sklearn_frame(model, columns)), key), False


def _finite_or_bad(probabilities: np.ndarray, key: str | None) -> np.ndarray:
    finite = np.isfinite(probabilities).all(axis=1)
    if finite.all():
        return probabilities
    message = "the model cannot score these values (they overflow its arithmetic); send smaller numbers"
    if key is None:
        raise BadInput({"body": [message]})
    raise BadInput({key: {str(index): [message] for index in np.flatnonzero(~finite)[:MAX_REPORTED_ROWS]}})


def _as_answered(probabilities: np.ndarray) -> np.ndarray:
    """float32 sums as a client expects them: each row summing to 1, without float32's last digits.

    100 trees' 0.01 add up to 0.9999993 in float32 where scikit-learn answers 1.0; rescaling the row in
    float64 and keeping 6 decimals moves no value by more than 1e-6 (the forms agree within 1e-5).
    """
    wide = probabilities.astype(np.float64)
    return np.round(wide / wide.sum(axis=1, keepdims=True), 6)


@functools.lru_cache(maxsize=256)
def _probability_objects(keys: tuple[str, ...]):
    """A function from probability rows to `{class: probability}` objects, made for these classes.

    A dict display with the class names bound (`{k0: p0, k1: p1, ...}`) builds 10,000 rows in about a
    third of the time `dict(zip(keys, row))` takes. The names are bound as values, never put in the
    source; past 64 classes the plain form is used.
    """
    if len(keys) > 64:
        return lambda rows: [dict(zip(keys, row)) for row in rows]
    values = "".join(f"p{i}, " for i in range(len(keys)))
    pairs = ", ".join(f"k{i}: p{i}" for i in range(len(keys)))
    namespace = {f"k{i}": key for i, key in enumerate(keys)}
    exec(f"def build(rows):\n    return [{{{pairs}}} for {values}in rows]\n", namespace)  # noqa: S102
    return namespace["build"]


def predict(model: LoadedModel, body, max_rows: int) -> dict:
    """Predict on a request body: labels and, where the estimator has them, class probabilities."""
    rows, key = parse_rows(body, model.feature_names)
    columns = validate_rows(model, rows, key, max_rows)
    answer = {"model": model.answer_model}
    if model.has_probabilities:
        probabilities, compiled = probabilities_of(model, columns, key)
        if model.runtime == "onnx" and not compiled:  # a row needed the float64 fallback: scikit-learn answered
            answer["model"] = {**model.answer_model, "runtime": "sklearn"}
        # Python lists of the raw values only where they are used: small batches' labels, sklearn's answer.
        raw = probabilities.tolist() if len(rows) <= SMALL_BATCH or not compiled else None
        # The label is the most probable class, as scikit-learn's own predict() does for these models.
        answer["predictions"] = _labels(model, probabilities, raw, compiled)
        answered = _as_answered(probabilities).tolist() if compiled else raw
        answer["probabilities"] = _probability_objects(tuple(model.class_keys))(answered)
    else:
        answer["predictions"] = model.estimator.predict(_sklearn_frame(model, columns)).tolist()
    return answer
