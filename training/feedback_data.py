"""Training data from labelled traffic: the prediction log's rows that came back with a label and kept their inputs.

`POST /train` with `{"dataset": {"source": "feedback", "model": NAME, "since": ISO time or 7d, "include_training_data":
true}}` trains on them (and, optionally, on the training rows of the version that answered most of them). The rows
are read once, when the request is accepted, and travel with the job like a client's inline rows: the job path,
its limits and its MLflow dataset record are the ones every job has. The dataset's digest covers the query and
the rows; its counts are recorded with it (`dataset_feedback_rows`, `dataset_training_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, datetime

import pandas as pd
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from training.datasets import BUILTIN_DATASETS, Dataset, DatasetError, from_frame, load_builtin

TARGET = "__label__"  # the labels' column while the frame is checked (no feature can be named so)


class Since(fields.Field):
    """An ISO time (UTC unless it says otherwise), or a span back from now: `7d`, `12h`, `30m`, `900s`."""

    def _deserialize(self, value, attr, data, **kwargs) -> datetime:
        from kernel.prediction_db import log_time

        if not isinstance(value, str):
            raise ValidationError("A time: an ISO time such as 2026-12-01T00:00:00Z, or a span back from now such as "
                                  "7d, 12h or 30m.")  # fmt: skip
        try:
            return log_time(value).replace(tzinfo=UTC)
        except ValueError:
            raise ValidationError(f"Not a time: {value[:40]!r}. An ISO time such as 2026-12-01T00:00:00Z, or a span "
                                  "back from now such as 7d, 12h or 30m.") from None  # fmt: skip


class FeedbackSource(Schema):
    """The `dataset` object of a /train body that trains on labelled traffic."""

    class Meta:
        unknown = RAISE

    source = fields.String(required=True, validate=validate.OneOf(["feedback"]), metadata={"example": "feedback"})
    model = fields.String(required=True, validate=validate.Length(min=1), metadata={"example": "churn-forest"})
    since = Since(metadata={"example": "7d", "description": "an ISO time, or a span back from now (7d, 12h, 30m)"})
    include_training_data = fields.Boolean(load_default=False)


def labelled_rows(engine, model: str, since: datetime | None, max_rows: int) -> tuple[list[tuple[dict, str, str]], int]:
    """(inputs, label, version) of the model's newest labelled rows that kept their inputs (at most `max_rows` + 1:
    one more says there are too many), and how many labelled rows did not keep them."""
    import sqlalchemy as sa

    from kernel.prediction_db import predictions as table

    labelled = [table.c.model == model, table.c.label.is_not(None)]
    if since is not None:
        labelled.append(table.c.created_at >= since.astimezone(UTC).replace(tzinfo=None))
    query = sa.select(table.c.inputs, table.c.label, table.c.version).where(*labelled, table.c.inputs.is_not(None))
    count = sa.select(sa.func.count()).select_from(table).where(*labelled, table.c.inputs.is_(None))
    with engine.connect() as connection:
        without = connection.execute(count).scalar_one()
        found = connection.execute(query.order_by(table.c.created_at.desc()).limit(max_rows + 1)).all()
    return [(json.loads(row.inputs), row.label, row.version) for row in reversed(found)], without


def served_schema(registry, model: str, version: str) -> tuple[list[str], str]:
    """The version's feature names and its labels' type (`long`, `double`, `boolean`, `string`), from its
    signature: feedback labels arrive as text and are turned back into that type."""
    import tempfile
    from pathlib import Path

    import yaml

    from kernel.refs import ModelRef

    with tempfile.TemporaryDirectory(prefix="feedback-") as folder:
        path = registry.download_model_version(ModelRef(model, str(version)), Path(folder))
        signature = yaml.safe_load((path / "MLmodel").read_text()).get("signature") or {}
    inputs = [column["name"] for column in json.loads(signature.get("inputs") or "[]")]
    outputs = json.loads(signature.get("outputs") or "[]")
    return inputs, (outputs[0].get("type") or "string") if outputs else "string"


def typed_labels(labels: list[str], kind: str) -> list:
    """Text labels as the served version's type; DatasetError naming one that is not of it."""
    cast = {"long": int, "integer": int, "double": float, "float": float,
            "boolean": lambda text: {"true": True, "false": False}[text.lower()]}.get(kind)  # fmt: skip
    if cast is None:
        return labels
    try:
        return [cast(label) for label in labels]
    except (ValueError, KeyError):
        bad = next(label for label in labels if not _castable(cast, label))
        raise DatasetError({"dataset": f"the label {bad!r} is not a {kind}, the type of the model's classes"}) from None


def _castable(cast, label: str) -> bool:
    try:
        cast(label)
        return True
    except (ValueError, KeyError):
        return False


def training_frame(registry, model: str, version: str) -> pd.DataFrame:
    """The rows the version was trained on, with their labels in TARGET."""
    from training.attempt import load_job_dataset
    from training.job_record import JobState

    run = registry.version_run(model, version)
    tags, job = run.data.tags, JobState.from_run(run)
    if job.dataset:  # trained by a job: the dataset its record names
        dataset = load_job_dataset(registry, job.job_id, job.dataset)
    elif tags.get("dataset") in BUILTIN_DATASETS:
        dataset = load_builtin(tags["dataset"])
    else:
        raise DatasetError({"dataset": f"{model} version {version}'s training data is not recorded; "
                                       "set include_training_data to false"})  # fmt: skip
    return dataset.features.assign(**{TARGET: dataset.labels.values})


def feedback_dataset(source: dict, engine, registry, limits: dict, min_rows: int) -> Dataset:
    """The dataset a feedback source names; DatasetError (a 400) with the counts when there is too little."""
    model, since = source["model"], source.get("since")
    rows, without = labelled_rows(engine, model, since, limits["max_rows"])
    if len(rows) > limits["max_rows"]:
        raise DatasetError({"dataset": f"more than {limits['max_rows']} labelled rows of {model}: give a later "
                                       "`since` (TRAIN_MAX_ROWS)"})  # fmt: skip
    if len(rows) < min_rows:
        hint = " Turn on PREDICTION_LOG_INPUTS so that answered rows keep their inputs." if without else ""
        raise DatasetError({"dataset": f"{len(rows)} labelled rows of {model} with their inputs"
                                       f"{' since ' + since.isoformat() if since else ''} ({without} more labelled "
                                       f"without inputs); at least {min_rows} are needed (PERFORMANCE_MIN_LABELS).{hint}"})  # fmt: skip
    version = Counter(version for _, _, version in rows).most_common(1)[0][0]  # the one most of them corrected
    features, kind = served_schema(registry, model, version)
    frame = pd.DataFrame.from_records([inputs for inputs, _, _ in rows])
    missing = sorted(set(features) - set(frame.columns))
    if missing:
        raise DatasetError({"dataset": f"the logged inputs lack features {model} version {version} takes: {missing} "
                                       "(PREDICTION_LOG_EXCLUDE keeps them out of the log)"})  # fmt: skip
    frame = frame[features] if features else frame
    frame[TARGET] = typed_labels([label for _, label, _ in rows], kind)
    training_rows = 0
    if source.get("include_training_data"):
        original = training_frame(registry, model, version)
        training_rows = len(original)
        frame = pd.concat([original, frame], ignore_index=True)
    dataset = from_frame(frame, TARGET, f"feedback-{model}", "feedback", limits)
    query = {"model": model, "since": since.isoformat() if since else None,
             "include_training_data": bool(source.get("include_training_data"))}  # fmt: skip
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode() + dataset.digest.encode()).hexdigest()[:16]
    dataset.digest = digest
    dataset.details = {"dataset_feedback_rows": len(rows), "dataset_training_rows": training_rows,
                       "dataset_query": json.dumps(query, sort_keys=True)}  # fmt: skip
    return dataset
