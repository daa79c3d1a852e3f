"""Request and response schemas of the fixed endpoints (the /predict row schema comes from the model)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema


class VersionField(fields.Field):
    """A version number, given as 3 or "3"."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
            raise ValidationError('A version number, like 3 or "3".')
        if int(value) < 1:
            raise ValidationError("Versions start at 1.")
        return str(int(value))


class UseModelRequest(Schema):
    """Which registered version to serve: a name and a version, or a name and an alias."""

    class Meta:
        unknown = RAISE

    name = fields.String(required=True, metadata={"example": "iris-RandomForestClassifier"})
    version = VersionField(metadata={"example": "1", "type": "string"})
    alias = fields.String(metadata={"example": "champion"})

    @validates_schema
    def one_of_version_or_alias(self, data, **kwargs):
        if ("version" in data) == ("alias" in data):
            raise ValidationError("Give exactly one of 'version' or 'alias'.", "_schema")


class ModelRefSchema(Schema):
    name = fields.String()
    version = fields.String()
    runtime = fields.String(
        validate=validate.OneOf(["onnx", "sklearn"]),
        metadata={"description": "what answered: ONNX Runtime (the version's verified compiled form) or scikit-learn"},
    )


class PredictResponse(Schema):
    model = fields.Nested(ModelRefSchema)
    predictions = fields.List(fields.Raw(), metadata={"example": ["setosa"]})
    probabilities = fields.List(
        fields.Dict(keys=fields.String(), values=fields.Float()),
        metadata={"example": [{"setosa": 1.0, "versicolor": 0.0, "virginica": 0.0}]},
    )
    prediction_ids = fields.List(
        fields.String(),
        metadata={
            "example": ["80b6346ef95f428b0"],
            "description": "one per row, for POST /feedback (the prediction log)",
        },
    )
    prediction_logged = fields.Boolean(
        metadata={
            "description": "false when this request was not recorded (PREDICTION_LOG_SAMPLE): its ids take no feedback"
        }
    )


class ModelEntry(Schema):
    name = fields.String()
    version = fields.String()
    created_at = fields.DateTime()
    estimator = fields.String(allow_none=True)
    dataset = fields.String(allow_none=True)
    metrics = fields.Dict(keys=fields.String(), values=fields.Float())
    runtime = fields.String(validate=validate.OneOf(["onnx", "sklearn"]))
    runtime_reason = fields.String(metadata={"description": "why this runtime serves the version"})
    run_id = fields.String(allow_none=True)
    aliases = fields.List(fields.String())
    active = fields.Boolean()


class ModelList(Schema):
    models = fields.List(fields.Nested(ModelEntry))
