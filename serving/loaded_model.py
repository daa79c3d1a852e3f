"""A registered version in memory: the estimator, its features, its schema and a sendable example."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, fields

from serving.registry import ModelRef
from serving.trusted_types import TRUSTED_TYPES

_NUMBER_TYPES = {"double", "float", "long", "integer"}


class ModelLoadError(Exception):
    """The version's files are not a model this service can serve."""


@dataclass(frozen=True)
class Feature:
    """One input column as the model's MLflow signature declares it."""

    name: str
    kind: str  # "number", "text" or "boolean"
    required: bool  # False when the training data had missing values: null is then accepted


class Number(fields.Float):
    """A JSON number: not a numeric string, not a boolean, not NaN or Infinity."""

    default_error_messages = {"invalid": "Not a valid number.", "special": "NaN and Infinity are not allowed."}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """true or false only (not 1, 0 or "yes"): what the column-at-a-time check accepts too."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def _field(feature: Feature) -> fields.Field:
    options = {"required": True, "allow_none": not feature.required}
    if feature.kind == "number":
        return Number(allow_nan=False, **options)
    if feature.kind == "boolean":
        return StrictBoolean(**options)
    return fields.String(**options)


def build_schema(features: tuple[Feature, ...], name: str) -> Schema:
    """The marshmallow schema of one row, built once per loaded version; unknown fields are errors."""
    return Schema.from_dict({f.name: _field(f) for f in features}, name=name)(unknown=RAISE)


@dataclass(frozen=True)
class LoadedModel:
    """Everything a prediction needs, swapped as one object so a request never mixes two versions."""

    ref: ModelRef
    estimator: Any
    features: tuple[Feature, ...]
    classes: tuple
    example: dict
    schema: Schema
    has_probabilities: bool

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


def _json_value(value):
    """A value of the input example as JSON would carry it (NaN becomes null)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def load_model_dir(path: Path, ref: ModelRef) -> LoadedModel:
    """Load a downloaded version: skops only, with the service's trusted types; never pickle."""
    import skops.io
    from mlflow.models import Model

    try:
        mlmodel = Model.load(str(path / "MLmodel"))
    except Exception as exc:
        raise ModelLoadError(f"{ref.name} version {ref.version} has no readable MLmodel file: {exc}") from exc
    flavor = mlmodel.flavors.get("sklearn")
    if not flavor or flavor.get("serialization_format") != "skops":
        raise ModelLoadError(
            f"{ref.name} version {ref.version} is not a scikit-learn model in skops format; "
            "this service does not load pickled models"
        )
    try:
        estimator = skops.io.load(path / flavor["pickled_model"], trusted=TRUSTED_TYPES)
    except Exception as exc:
        raise ModelLoadError(f"{ref.name} version {ref.version} could not be loaded: {exc}") from exc
    signature = mlmodel.signature
    if signature is None or not signature.inputs.has_input_names():
        raise ModelLoadError(f"{ref.name} version {ref.version} has no signature with feature names")
    features = []
    for column in signature.inputs.inputs:
        kind = column.type.name
        kind = "number" if kind in _NUMBER_TYPES else "boolean" if kind == "boolean" else "text"
        features.append(Feature(column.name, kind, column.required))
    features = tuple(features)
    example_frame = mlmodel.load_input_example(str(path))
    if example_frame is None or len(example_frame) == 0:
        raise ModelLoadError(f"{ref.name} version {ref.version} has no input example")
    example = {name: _json_value(example_frame.iloc[0][name]) for name in (f.name for f in features)}
    return LoadedModel(
        ref=ref,
        estimator=estimator,
        features=features,
        classes=tuple(estimator.classes_.tolist()),
        example=example,
        schema=build_schema(features, f"Row_{ref.name}_{ref.version}"),
        has_probabilities=hasattr(estimator, "predict_proba"),
    )
