"""Datasets a job can train on: scikit-learn's built-in ones, client rows inline, or a CSV file."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pandas as pd
from sklearn import datasets as sk_datasets

from kernel.model_format import BATCH_KEYS

BUILTIN_DATASETS = {
    "iris": sk_datasets.load_iris,
    "wine": sk_datasets.load_wine,
    "breast_cancer": sk_datasets.load_breast_cancer,
    "digits": sk_datasets.load_digits,
}
MIN_CLASSES = 2
# The top-level keys of /predict's batch bodies cannot be feature names.
RESERVED_NAMES = BATCH_KEYS
MIN_ROWS_PER_CLASS = 5


class DatasetError(ValueError):
    """The client's data breaks one of the rules; `errors` says which, per field."""

    def __init__(self, errors: dict):
        super().__init__("; ".join(f"{key}: {value}" for key, value in errors.items()))
        self.errors = {key: [value] for key, value in errors.items()}  # marshmallow's shape: a list per field


@dataclass
class Dataset:
    """Features and labels ready to fit, with what MLflow should record about where they came from."""

    name: str
    features: pd.DataFrame
    labels: pd.Series
    source: str  # "builtin", "inline", "csv" or "feedback"
    digest: str = field(default="")
    details: dict = field(default_factory=dict)  # more to record with it (a feedback dataset's counts and query)

    def describe(self) -> dict:
        """The dataset's reference for the run: name, source, content hash, shape and columns."""
        return {
            "dataset": self.name,
            "dataset_source": self.source,
            "dataset_digest": self.digest,
            "dataset_rows": int(self.features.shape[0]),
            "dataset_columns": int(self.features.shape[1]),
            "feature_names": list(self.features.columns),
            "classes": [str(label) for label in sorted(self.labels.unique(), key=str)],
            **self.details,
        }


def readable_name(column: str) -> str:
    """'sepal length (cm)' -> 'sepal_length_cm': feature names that are easy to type in JSON."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", str(column)).strip("_").lower() or "column"


def load_builtin(name: str) -> Dataset:
    """One of scikit-learn's shipped datasets, with readable feature names and real class names."""
    if name not in BUILTIN_DATASETS:
        raise DatasetError({"dataset": f"unknown dataset {name!r}; one of {sorted(BUILTIN_DATASETS)}"})
    bunch = BUILTIN_DATASETS[name]()
    features = pd.DataFrame(bunch.data, columns=[readable_name(c) for c in bunch.feature_names])
    target_names = [str(label) for label in bunch.target_names]
    labels = pd.Series([target_names[index] for index in bunch.target], name="target")
    digest = hashlib.sha256(pd.util.hash_pandas_object(features).values.tobytes()).hexdigest()
    return Dataset(name, features.astype("float64"), labels, "builtin", digest[:16])


def from_frame(frame: pd.DataFrame, target: str, name: str, source: str, limits: dict) -> Dataset:
    """Client rows as a dataset: checks the rules, then types the columns the way serving expects."""
    if frame.shape[1] > limits["max_columns"] + 1:
        raise DatasetError({"data": f"{frame.shape[1]} columns; at most {limits['max_columns']} features"})
    if len(frame) > limits["max_rows"]:
        raise DatasetError({"data": f"{len(frame)} rows; at most {limits['max_rows']}"})
    if not target:
        raise DatasetError({"target": "name the column that holds the class labels"})
    if target not in frame.columns:
        raise DatasetError({"target": f"no column {target!r}; columns are {list(frame.columns)}"})
    frame = frame.rename(columns={c: str(c) for c in frame.columns})
    reserved = sorted(set(frame.columns) & set(RESERVED_NAMES))
    if reserved:
        raise DatasetError({"data": f"rename the columns {reserved}: /predict reads those names as batch forms"})
    labels = frame[target]
    if labels.isna().any():
        raise DatasetError({"target": f"{int(labels.isna().sum())} rows have no label"})
    if labels.map(type).nunique() > 1:
        raise DatasetError({"target": "the labels mix types (numbers and text); use one type for all"})
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise DatasetError({"data": "no feature columns besides the target"})
    counts = labels.value_counts()
    if len(counts) < MIN_CLASSES:
        raise DatasetError({"target": f"only one class ({counts.index[0]!r}); a classifier needs at least two"})
    rare = {str(label): int(n) for label, n in counts.items() if n < MIN_ROWS_PER_CLASS}
    if rare:
        raise DatasetError({"target": f"each class needs at least {MIN_ROWS_PER_CLASS} rows; too few: {rare}"})
    features = typed_features(features)
    if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
        labels = labels.astype("int64")  # CSV readers turn 0/1 into 0.0/1.0 when a value is missing
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()
    return Dataset(name, features, labels.reset_index(drop=True), source, digest[:16])


def typed_features(features: pd.DataFrame) -> pd.DataFrame:
    """Numbers become float64 (so a missing value is NaN, not a type change); the rest become text."""
    typed = {}
    for column in features.columns:
        values = features[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            typed[column] = values.astype("float64")
        else:
            typed[column] = values.map(lambda v: np.nan if pd.isna(v) else str(v)).astype(object)
    return pd.DataFrame(typed).reset_index(drop=True)


def _header_width(stream: BinaryIO) -> int:
    """The number of fields in the CSV's first record (quotes and quoted line breaks respected)."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        return len(next(csv.reader(text), []))
    finally:
        text.detach()  # leave the caller's stream open


def from_records(records: list, target: str, limits: dict) -> Dataset:
    """Inline rows: a list of objects, each with the target column."""
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise DatasetError({"data": "a non-empty list of objects, one per row"})
    return from_frame(pd.DataFrame.from_records(records), target, "inline", "inline", limits)


def from_csv(content: bytes | BinaryIO, target: str, limits: dict, filename: str = "upload.csv") -> Dataset:
    """A CSV file with a header row (bytes or a seekable binary file), held to the limits before it is parsed.

    The header alone says how many columns there are: an over-wide file is refused after reading one
    line. The parse then stops one row past the row limit, so an over-long file is never read whole.
    """
    stream = io.BytesIO(content) if isinstance(content, bytes | bytearray) else content
    try:
        columns = _header_width(stream)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetError({"file": f"not a readable CSV file: {exc}"}) from exc
    if columns > limits["max_columns"] + 1:
        raise DatasetError({"data": f"{columns} columns; at most {limits['max_columns']} features"})
    stream.seek(0)
    try:
        frame = pd.read_csv(stream, nrows=limits["max_rows"] + 1)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError({"file": f"not a readable CSV file: {exc}"}) from exc
    if len(frame) > limits["max_rows"]:
        raise DatasetError({"data": f"more than {limits['max_rows']} rows; at most {limits['max_rows']}"})
    name = readable_name(filename.rsplit(".", 1)[0]) or "csv"
    return from_frame(frame, target, name, "csv", limits)
