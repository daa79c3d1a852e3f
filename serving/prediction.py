"""Prediction as a plain function: request body in, answer out; the view only adapts HTTP."""

from __future__ import annotations

import functools

import numpy as np
from marshmallow import ValidationError

from kernel.model_format import BATCH_KEYS, first_top_index, label_indices
from serving.arrays import SMALL_BATCH, fast_columns, onnx_probabilities, sklearn_frame
from serving.loaded_model import LoadedModel

MAX_REPORTED_ROWS = 20


def _labels(model: LoadedModel, probabilities: np.ndarray, rows: list[list[float]] | None, compiled: bool) -> list:
    """Each row's label, as label_indices picks it (in plain Python for a few rows: no numpy call setup)."""
    if rows is None or len(rows) > SMALL_BATCH:
        return model.class_array[label_indices(probabilities, compiled)].tolist()
    return [model.classes[first_top_index(row, compiled)] for row in rows]


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


def probabilities_of(model: LoadedModel, columns: dict, key: str | None) -> tuple[np.ndarray, bool]:
    """Class probabilities per row, and whether ONNX Runtime computed them (the version is compiled).

    A row that overflows 32-bit arithmetic (an extreme but finite value) is scored again by
    scikit-learn in 64 bits; a row no runtime can score is a 400, never a NaN in the answer.
    """
    if model.session is not None:
        probabilities = onnx_probabilities(model, columns)
        if np.isfinite(probabilities).all():
            return probabilities, True
        if model.estimator is None:
            return _finite_or_bad(probabilities, key), True
    return _finite_or_bad(model.estimator.predict_proba(sklearn_frame(model, columns)), key), False


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
def probability_objects(keys: tuple[str, ...]):
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


def predict(model: LoadedModel, body, max_rows: int, observe=None) -> dict:
    """Predict on a request body: labels and, where the estimator has them, class probabilities.

    `observe(model, columns, labels)` hears the validated columns and the labels of an answered request
    (the drift counter): nothing is parsed twice.
    """
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
        answer["probabilities"] = probability_objects(tuple(model.class_keys))(answered)
    else:
        answer["predictions"] = model.estimator.predict(sklearn_frame(model, columns)).tolist()
    if observe is not None:
        observe(model, columns, answer["predictions"])
    return answer
