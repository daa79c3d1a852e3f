"""Prediction as a plain function: request body in, answer out; the view only adapts HTTP."""

from __future__ import annotations

import numpy as np
import pandas as pd
from marshmallow import ValidationError

from serving.loaded_model import LoadedModel

# The batch forms: ours ("records") and those of MLflow's scoring server.
BATCH_KEYS = ("records", "dataframe_records", "dataframe_split", "instances", "inputs")
MAX_REPORTED_ROWS = 20
_ALLOWED_TYPES = {
    "number": (int, float),
    "text": (str,),
    "boolean": (bool,),
}


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


def parse_rows(body, feature_names: list[str]) -> tuple[list, bool]:
    """The rows of a body in any accepted form, and whether it was the one-row form."""
    if not isinstance(body, dict):
        raise BadInput({"body": ['a JSON object: one row {feature: value, ...} or {"records": [...]}']})
    batch_keys = [key for key in BATCH_KEYS if key in body]
    if not batch_keys:
        return [body], True
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
    return rows, False


def _fast_columns(model: LoadedModel, rows: list) -> dict | None:
    """Columns as arrays when every row is valid, checked a column at a time; None if any is not.

    Accepts exactly what the marshmallow schema accepts (tests/test_validation.py checks both agree);
    the schema then only runs on failing bodies, to say what is wrong.
    """
    names = model.feature_names
    expected = set(names)
    if not all(type(row) is dict and row.keys() == expected for row in rows):
        return None
    columns = {}
    for feature in model.features:
        values = [row[feature.name] for row in rows]
        allowed = _ALLOWED_TYPES[feature.kind] + (() if feature.required else (type(None),))
        if not all(type(v) in allowed for v in values):
            return None
        if feature.kind == "number":
            present = values if feature.required else [v for v in values if v is not None]
            try:
                if not np.isfinite(np.array(present, dtype="float64")).all():
                    return None  # NaN or Infinity (Python's JSON parser accepts both)
            except OverflowError:
                return None  # an integer too large for a float: the schema says "Number too large."
            columns[feature.name] = np.array([np.nan if v is None else v for v in values], dtype="float64")
        elif feature.kind == "text":
            columns[feature.name] = np.array([np.nan if v is None else v for v in values], dtype=object)
        else:
            columns[feature.name] = np.array(values, dtype=bool)
    return columns


def _row_errors(model: LoadedModel, rows: list, single: bool) -> dict:
    """What is wrong, per field (one row) or per row index (a batch), from the marshmallow schema."""
    errors = {}
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValidationError({"_row": ["each row must be an object {feature: value, ...}"]})
            model.schema.load(row)
        except ValidationError as exc:
            if single:
                return exc.messages
            errors[str(index)] = exc.messages
            if len(errors) >= MAX_REPORTED_ROWS:
                break
    return errors


def validate_rows(model: LoadedModel, rows: list, single: bool, max_rows: int) -> pd.DataFrame:
    """The rows as a frame in the model's column order and types, or BadInput saying what is wrong."""
    if len(rows) > max_rows:
        raise BadInput({"records": [f"{len(rows)} rows; at most {max_rows} per request"]})
    columns = _fast_columns(model, rows)
    if columns is None:
        errors = _row_errors(model, rows, single)
        if not errors:  # both validators must agree; if they do not, refuse rather than guess
            errors = {"body": ["the rows do not match the model's features"]}
        raise BadInput(errors if single else {"rows": errors})
    return pd.DataFrame(columns, columns=model.feature_names)


def predict(model: LoadedModel, body, max_rows: int) -> dict:
    """Predict on a request body: labels and, where the estimator has them, class probabilities."""
    rows, single = parse_rows(body, model.feature_names)
    frame = validate_rows(model, rows, single, max_rows)
    answer = {"model": model.ref.as_dict()}
    if model.has_probabilities:
        probabilities = model.estimator.predict_proba(frame)
        # The label is the most probable class, as scikit-learn's own predict() does for these models.
        labels = np.asarray(model.classes, dtype=object)[probabilities.argmax(axis=1)]
        keys = [str(label) for label in model.classes]
        answer["predictions"] = labels.tolist()
        answer["probabilities"] = [dict(zip(keys, row)) for row in probabilities.tolist()]
    else:
        answer["predictions"] = model.estimator.predict(frame).tolist()
    return answer
