"""The marshmallow schema of one /predict row, built from a version's features."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from kernel import model_format
from serving.arrays import Feature


class Number(fields.Float):
    """A JSON number: not a numeric string, not a boolean, not NaN or Infinity."""

    default_error_messages = {
        "invalid": "Not a valid number.",
        "special": "NaN and Infinity are not allowed.",
        "too_large": f"Number too large: the model computes in 32-bit floats, which hold at most ±{model_format.FLOAT32_MAX:.7g}.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        number = super()._deserialize(value, attr, data, **kwargs)
        if abs(number) > model_format.FLOAT32_MAX:
            raise self.make_error("too_large")
        return number


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
