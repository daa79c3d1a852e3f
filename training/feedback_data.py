"""Training data from labelled traffic: the prediction log's rows that came back with a label and kept their inputs.

`POST /train` with `{"dataset": {"source": "feedback", "model": NAME, "since": ISO time, "include_training_data":
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
from marshmallow import RAISE, Schema, fields, validate

from training.datasets import BUILTIN_DATASETS, Dataset, DatasetError, from_frame, load_builtin

TARGET = "__label__"  # the labels' column while the frame is checked (no feature can be named so)


class FeedbackSource(Schema):
    """The `dataset` object of a /train body that trains on labelled traffic."""

    class Meta:
        unknown = RAISE

    source = fields.String(required=True, validate=validate.OneOf(["feedback"]), metadata={"example": "feedback"})
    model = fields.String(required=True, validate=validate.Length(min=1), metadata={"example": "churn-forest"})
    since = fields.AwareDateTime(default_timezone=UTC, metadata={"example": "2026-12-01T00:00:00Z"})
    include_training_data = fields.Boolean(load_default=False)


def labelled_rows(engine, model: str, since: datetime | None) -> tuple[list[tuple[dict, str, str]], int]:
    """(inputs, label, version) of the model's labelled rows that kept their inputs, and how many did not."""
    import sqlalchemy as sa

    from kernel.prediction_db import predictions as table

    query = sa.select(table.c.inputs, table.c.label, table.c.version).where(
        table.c.model == model, table.c.label.is_not(None)
    )
    if since is not None:
        query = query.where(table.c.created_at >= since.astimezone(UTC).replace(tzinfo=None))
    kept, without = [], 0
    with engine.connect() as connection:
        for row in connection.execute(query.order_by(table.c.created_at)):
            if row.inputs is None:
                without += 1
            else:
                kept.append((json.loads(row.inputs), row.label, row.version))
    return kept, without


def training_frame(registry, model: str, version: str) -> pd.DataFrame:
    """The rows the version was trained on, with their labels in TARGET."""
    from training.attempt import load_job_dataset

    run = registry.version_run(model, version)
    tags = run.data.tags
    if "job.dataset" in tags:
        dataset = load_job_dataset(registry, run.info.run_id, json.loads(tags["job.dataset"]))
    elif tags.get("dataset") in BUILTIN_DATASETS:
        dataset = load_builtin(tags["dataset"])
    else:
        raise DatasetError({"dataset": f"{model} version {version}'s training data is not recorded; "
                                       "set include_training_data to false"})  # fmt: skip
    return dataset.features.assign(**{TARGET: dataset.labels.values})


def feedback_dataset(source: dict, engine, registry, limits: dict, min_rows: int) -> Dataset:
    """The dataset a feedback source names; DatasetError (a 400) with the counts when there is too little."""
    model, since = source["model"], source.get("since")
    rows, without = labelled_rows(engine, model, since)
    if len(rows) < min_rows:
        hint = " Turn on PREDICTION_LOG_INPUTS so that answered rows keep their inputs." if without else ""
        raise DatasetError({"dataset": f"{len(rows)} labelled rows of {model} with their inputs"
                                       f"{' since ' + since.isoformat() if since else ''} ({without} more labelled "
                                       f"without inputs); at least {min_rows} are needed (PERFORMANCE_MIN_LABELS).{hint}"})  # fmt: skip
    frame = pd.DataFrame.from_records([inputs for inputs, _, _ in rows])
    frame[TARGET] = [label for _, label, _ in rows]
    training_rows = 0
    if source.get("include_training_data"):
        version = Counter(version for _, _, version in rows).most_common(1)[0][0]
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
