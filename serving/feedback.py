"""Ground truth and live accuracy, as plain functions over the prediction log's database.

`apply_feedback` records labels against logged prediction ids (the last label for an id wins, and its
arrival time is kept); `performance` compares a version's logged predictions with the labels that came
back within a window: accuracy, macro F1, per-class precision and recall, the confusion matrix and the
label lag, beside the version's hold-out metrics from training.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import sqlalchemy as sa
from marshmallow import RAISE, Schema, ValidationError, fields, validate

from kernel.prediction_db import predictions

_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_WINDOW = 3600
CHUNK = 500  # ids per query: under every backend's parameter limit
LAG_ROWS = 10_000  # the label lag's percentiles come from the newest labels, at most this many


class LabelField(fields.Field):
    """A class label, as a string or a number (compared with the version's classes as text)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
            raise ValidationError("A class label: a non-empty string or a number.")
        return str(value)


class FeedbackItem(Schema):
    class Meta:
        unknown = RAISE

    prediction_id = fields.String(required=True, validate=validate.Length(min=1, max=40))
    label = LabelField(required=True)


def feedback_schema(max_items: int) -> Schema:
    class FeedbackRequest(Schema):
        """POST /feedback: labels for logged predictions, by id."""

        class Meta:
            unknown = RAISE

        feedback = fields.List(
            fields.Nested(FeedbackItem), required=True, validate=validate.Length(min=1, max=max_items)
        )

    return FeedbackRequest()


def parse_window(text: str, retention_days: int) -> int:
    """`7d`, `12h`, `900s` as seconds, from 1 hour to the retention; ValueError otherwise."""
    match = _WINDOW.match(text or "")
    if not match:
        raise ValueError("A window like 7d, 12h or 900s.")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not MIN_WINDOW <= seconds <= max(retention_days * 86400, MIN_WINDOW):
        raise ValueError(f"A window from 1h to {retention_days}d (PREDICTION_LOG_RETENTION_DAYS).")
    return seconds


def apply_feedback(engine: sa.Engine, items: list[dict], classes_of: Callable[[str, str], list[str]]) -> dict:
    """Record the labels; per-item results: accepted (first label), updated (replaced), unknown ids, invalid."""
    latest = {item["prediction_id"]: item["label"] for item in items}  # within one request, the last wins too
    found: dict[str, tuple] = {}
    ids = list(latest)
    with engine.connect() as connection:
        for start in range(0, len(ids), CHUNK):
            query = sa.select(predictions.c.id, predictions.c.model, predictions.c.version, predictions.c.label)
            for row in connection.execute(query.where(predictions.c.id.in_(ids[start : start + CHUNK]))):
                found[row.id] = (row.model, row.version, row.label)
    classes: dict[tuple[str, str], set[str]] = {}
    updates, invalid, accepted, updated = [], [], 0, 0
    now = datetime.now(UTC).replace(tzinfo=None)
    for prediction_id, label in latest.items():
        if prediction_id not in found:
            continue
        model, version, previous = found[prediction_id]
        known = classes.setdefault((model, version), set(classes_of(model, version)))
        if label not in known:
            invalid.append({"prediction_id": prediction_id, "label": label,
                            "reason": f"not a class of {model} version {version} ({', '.join(sorted(known))})"})  # fmt: skip
            continue
        updates.append({"pid": prediction_id, "new_label": label, "at": now})
        updated += previous is not None
        accepted += previous is None
    if updates:
        statement = (
            sa.update(predictions)
            .where(predictions.c.id == sa.bindparam("pid"))
            .values(label=sa.bindparam("new_label"), labelled_at=sa.bindparam("at"))
        )
        with engine.begin() as connection:
            connection.execute(statement, updates)
    unknown = [prediction_id for prediction_id in latest if prediction_id not in found]
    return {"accepted": accepted, "updated": updated, "unknown_ids": unknown, "invalid": invalid}


def performance(engine: sa.Engine, name: str, version: str, seconds: int, classes: list[str], min_labels: int) -> dict:
    """A version's live figures over the window (by prediction time); `insufficient_labels` below the minimum."""
    since = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=seconds)
    where = sa.and_(predictions.c.model == name, predictions.c.version == version, predictions.c.created_at >= since)
    labelled = sa.and_(where, predictions.c.label.is_not(None))
    with engine.connect() as connection:
        predicted = connection.execute(sa.select(sa.func.count()).select_from(predictions).where(where)).scalar_one()
        # The confusion counts in the database (a row per pair of labels), not 100,000 rows through Python.
        pairs = connection.execute(sa.select(predictions.c.label, predictions.c.prediction, sa.func.count())
                                   .where(labelled).group_by(predictions.c.label, predictions.c.prediction)).all()  # fmt: skip
        count = sum(pair[2] for pair in pairs)
        newest = sa.select(predictions.c.created_at, predictions.c.labelled_at).where(labelled)
        lagged = connection.execute(newest.order_by(predictions.c.labelled_at.desc()).limit(LAG_ROWS)).all()
    answer = {"model": {"name": name, "version": version}, "window_seconds": seconds, "since": since.isoformat() + "Z",
              "predicted_rows": predicted, "labelled_rows": count,
              "coverage": count / predicted if predicted else None}  # fmt: skip
    if count < min_labels:
        return {**answer, "status": "insufficient_labels",
                "message": f"{count} labelled rows in the window; accuracy needs {min_labels} (PERFORMANCE_MIN_LABELS)."}  # fmt: skip
    lags = np.asarray([(row.labelled_at - row.created_at).total_seconds() for row in lagged])
    return {**answer, "status": "ok", **scores_of_pairs(pairs, classes),
            "label_lag_seconds": {"p50": float(np.percentile(lags, 50)), "p90": float(np.percentile(lags, 90))}}  # fmt: skip


def scores(true_labels: list[str], predicted: list[str], classes: list[str]) -> dict:
    """Accuracy, macro F1, per-class precision and recall, and the confusion matrix (rows: true, columns:
    predicted, in `classes` order), in numpy: the compiled-only stack has no scikit-learn."""
    return scores_of_pairs(((truth, guess, 1) for truth, guess in zip(true_labels, predicted, strict=True)), classes)


def scores_of_pairs(pairs, classes: list[str]) -> dict:
    """`scores` from (true label, predicted label, how many rows) triples: what a GROUP BY gives."""
    index = {label: position for position, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for truth, guess, count in pairs:
        if truth in index and guess in index:
            matrix[index[truth], index[guess]] += count
    hits = np.diag(matrix).astype(float)
    predicted_per_class, true_per_class = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted_per_class, out=np.zeros_like(hits), where=predicted_per_class > 0)
    recall = np.divide(hits, true_per_class, out=np.zeros_like(hits), where=true_per_class > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    present = true_per_class > 0  # macro over the classes that occur in the labels (scikit-learn's labels=present)
    return {
        "accuracy": float(hits.sum() / matrix.sum()) if matrix.sum() else None,
        "f1_macro": float(f1[present | (predicted_per_class > 0)].mean()) if matrix.sum() else None,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(true_per_class[i])}
            for label, i in index.items()
        },  # fmt: skip
        "confusion_matrix": {"labels": classes, "matrix": matrix.tolist()},
    }
