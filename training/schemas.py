"""The body of POST /train, as JSON or as the fields of a multipart CSV upload."""

from __future__ import annotations

import json

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from training.datasets import BUILTIN_DATASETS
from training.estimators import ESTIMATORS

MODEL_NAME = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", error="Letters, digits, '-', '_' and '.', at most 100, starting alphanumeric."
)


class JSONObject(fields.Field):
    """An object, or (in a multipart form) the JSON text of one."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
                raise ValidationError("Not valid JSON.") from exc
        if not isinstance(value, dict):
            raise ValidationError('An object of hyperparameters, like {"n_estimators": 200}.')
        return value


class TrainRequest(Schema):
    """Estimator, its hyperparameters, and exactly one data source: `dataset`, `data` or a CSV `file`."""

    class Meta:
        unknown = RAISE

    estimator = fields.String(
        required=True,
        validate=validate.OneOf(sorted(ESTIMATORS), error="Unknown estimator; one of: {choices}."),
        metadata={"example": "RandomForestClassifier"},
    )
    params = JSONObject(load_default=dict, metadata={"example": {"n_estimators": 200, "max_depth": 8}})
    dataset = fields.String(
        validate=validate.OneOf(sorted(BUILTIN_DATASETS), error="Unknown dataset; one of: {choices}."),
        metadata={"example": "wine"},
    )
    data = fields.List(fields.Dict(), metadata={"description": "Rows with the target column, instead of `dataset`."})
    target = fields.String(metadata={"description": "The column of `data` or of the CSV file holding the labels."})
    model_name = fields.String(validate=MODEL_NAME, metadata={"example": "wine-forest"})
    activate = fields.Boolean(load_default=True)
    wait = fields.Boolean(load_default=False)

    @validates_schema
    def one_data_source(self, data, **kwargs):
        sources = [key for key in ("dataset", "data", "file") if key in data or key in self.context_sources]
        if not sources:
            raise ValidationError(
                "Give `dataset` (one of the built-in ones), `data` with `target`, or a CSV `file`.", "dataset"
            )
        if len(sources) > 1:
            raise ValidationError(f"Give one data source, not {sources}.", "dataset")
        if "dataset" not in sources and not data.get("target"):
            raise ValidationError("Name the column that holds the class labels.", "target")
        if "dataset" in sources and "target" in data:
            raise ValidationError(
                "`target` goes with `data` or a CSV `file`; a built-in dataset has its own.", "target"
            )

    context_sources: tuple = ()


def load_train_request(body: dict, uploaded_file: bool = False) -> dict:
    """Validate a /train body; `uploaded_file` says a multipart `file` came with the form."""
    schema = TrainRequest()
    schema.context_sources = ("file",) if uploaded_file else ()
    return schema.load(body)
