"""The body of POST /train (JSON or a multipart CSV upload) and of `python -m training`: one parse for both."""

from __future__ import annotations

import json
from dataclasses import dataclass

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate, validates_schema

from training.datasets import BUILTIN_DATASETS, Dataset, DatasetError, from_csv, from_records
from training.estimators import ESTIMATORS, validate_params
from training.spec import TrainingSpec

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


class DatasetSource(fields.Field):
    """`dataset`: a built-in dataset's name, or an object naming labelled traffic (training/feedback_data.py)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            if value not in BUILTIN_DATASETS:
                raise ValidationError(f"Unknown dataset; one of: {', '.join(sorted(BUILTIN_DATASETS))}.")
            return value
        if isinstance(value, dict):
            from training.feedback_data import FeedbackSource

            return FeedbackSource().load(value)
        raise ValidationError("A built-in dataset's name, or a feedback source object.")


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
    dataset = DatasetSource(
        metadata={"example": "wine", "description": "A built-in dataset's name, or `{\"source\": \"feedback\", "
                  "\"model\": NAME, \"since\": ISO time or 7d, \"include_training_data\": false}`: the model's labelled "
                  "traffic from the prediction log (its inputs recorded: PREDICTION_LOG_INPUTS)"},
    )  # fmt: skip
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

    @post_load
    def estimator_params(self, data, **kwargs):
        """The hyperparameters, checked against the chosen estimator's own schema."""
        data["params"] = validate_params(data["estimator"], data["params"])
        return data

    context_sources: tuple = ()


class InvalidTrainingRequest(ValueError):
    """The request breaks a rule; `errors` says which, per field (marshmallow's shape)."""

    def __init__(self, errors: dict, message: str = "The training request is not valid; nothing was trained."):
        super().__init__(message)
        self.errors = errors
        self.message = message


@dataclass
class TrainingRequest:
    """A validated request: what to train, on which data (a built-in name or the client's checked rows)."""

    spec: TrainingSpec
    dataset: str | Dataset
    wait: bool = False


def parse_train_request(body: dict, limits: dict, upload: tuple | None = None, feedback=None) -> TrainingRequest:
    """Turn a /train body (or the CLI's arguments) into a training spec and its dataset.

    `upload` is a CSV file (bytes or a binary stream) and its name. `limits` has `max_rows` and `max_columns`.
    `feedback(source, limits)` reads a feedback source's rows (None: this caller cannot, and says so). Raises
    InvalidTrainingRequest; every check of the request happens here, once.
    """
    schema = TrainRequest()
    schema.context_sources = ("file",) if upload is not None else ()
    try:
        parsed = schema.load(body)
        if isinstance(parsed.get("dataset"), dict):
            if feedback is None:
                raise DatasetError({"dataset": "a feedback source needs the service's prediction log: POST /train"})
            dataset = feedback(parsed["dataset"], limits)
        elif "dataset" in parsed:
            dataset = parsed["dataset"]  # travels by name; the job loads it
        elif upload is not None:
            dataset = from_csv(upload[0], parsed["target"], limits, upload[1] or "upload.csv")
        else:
            dataset = from_records(parsed["data"], parsed["target"], limits)
    except ValidationError as exc:
        raise InvalidTrainingRequest(exc.messages) from exc
    except DatasetError as exc:
        raise InvalidTrainingRequest(exc.errors, f"The data cannot be trained on: {exc}") from exc
    # Retrained on a model's own traffic: a new version of that model, unless the request names another.
    name = parsed.get("model_name") or (parsed["dataset"]["model"] if isinstance(parsed.get("dataset"), dict) else None)
    spec = TrainingSpec(parsed["estimator"], parsed["params"], name, parsed["activate"])
    return TrainingRequest(spec, dataset, parsed["wait"])
