"""Live accuracy per version, for Prometheus: computed from the prediction log by one process per machine at
most every `PERFORMANCE_REFRESH_SECONDS`, kept as a snapshot file, and read (never computed) at each scrape.

The snapshot (`<state dir>/live-performance.json`) holds, per version with labelled rows predicted within
`PERFORMANCE_WINDOW_HOURS`: the labelled rows, accuracy, macro F1, the label lag's p50 and p90, and the
version's hold-out accuracy from training (the `ModelAccuracyDrop` alert compares the two).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from prometheus_client.core import GaugeMetricFamily

SNAPSHOT = "live-performance.json"


def compute(engine, window_seconds: int, holdout_of: Callable[[str, str], dict]) -> list[dict]:
    """Per version: the live figures over the window (SQLAlchemy imported here: the caller has an engine)."""
    import sqlalchemy as sa

    from kernel.prediction_db import predictions
    from serving.feedback import scores

    since = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=window_seconds)
    columns = (predictions.c.model, predictions.c.version, predictions.c.prediction, predictions.c.label,
               predictions.c.created_at, predictions.c.labelled_at)  # fmt: skip
    query = sa.select(*columns).where(predictions.c.created_at >= since, predictions.c.label.is_not(None))
    groups: dict[tuple[str, str], list] = {}
    with engine.connect() as connection:
        for row in connection.execute(query):
            groups.setdefault((row.model, row.version), []).append(row)
    found = []
    for (model, version), rows in sorted(groups.items()):
        truth, guessed = [r.label for r in rows], [r.prediction for r in rows]
        figures = scores(truth, guessed, sorted(set(truth) | set(guessed)))
        lags = np.asarray([(r.labelled_at - r.created_at).total_seconds() for r in rows])
        try:
            holdout = holdout_of(model, version).get("accuracy")
        except Exception:  # the version was deleted, or MLflow is away: the live figures stand alone
            holdout = None
        found.append({"model": model, "version": version, "labelled_rows": len(rows), "accuracy": figures["accuracy"],
                      "f1_macro": figures["f1_macro"], "lag_p50": float(np.percentile(lags, 50)),
                      "lag_p90": float(np.percentile(lags, 90)), "holdout_accuracy": holdout})  # fmt: skip
    return found


def write_snapshot(state_dir: Path, versions: list[dict]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".live-", dir=state_dir)
    with os.fdopen(handle, "w") as file:
        json.dump({"versions": versions}, file)
    os.replace(staging, state_dir / SNAPSHOT)


class LivePerformanceCollector:
    """`model_live_accuracy`, `model_live_f1_macro`, `model_labelled_rows`, `model_label_lag_seconds{quantile}`,
    `model_holdout_accuracy` and `model_accuracy_alert_floor` per version, from this machine's snapshot."""

    def __init__(self, state_dir: Path, alert_drop: float = 0.05, min_labels: int = 50):
        self.path = Path(state_dir) / SNAPSHOT
        self.alert_drop, self.min_labels = alert_drop, min_labels

    def collect(self):
        try:
            versions = json.loads(self.path.read_text())["versions"]
        except (OSError, ValueError, KeyError):
            versions = []
        labels = ["model", "version"]
        accuracy = GaugeMetricFamily(
            "model_live_accuracy", "Accuracy on the labels that came back (window)", labels=labels
        )
        f1 = GaugeMetricFamily("model_live_f1_macro", "Macro F1 on the labels that came back (window)", labels=labels)
        labelled = GaugeMetricFamily("model_labelled_rows", "Labelled rows predicted within the window", labels=labels)
        lag = GaugeMetricFamily(
            "model_label_lag_seconds", "Time from prediction to label", labels=[*labels, "quantile"]
        )
        holdout = GaugeMetricFamily(
            "model_holdout_accuracy", "The version's hold-out accuracy from training", labels=labels
        )
        floor = GaugeMetricFamily(
            "model_accuracy_alert_floor",
            "The hold-out accuracy minus PERFORMANCE_ALERT_DROP, once the version has PERFORMANCE_MIN_LABELS labelled "
            "rows: live accuracy below it for 30 minutes is the ModelAccuracyDrop alert",
            labels=labels,
        )
        for entry in versions:
            key = [entry["model"], entry["version"]]
            labelled.add_metric(key, entry["labelled_rows"])
            if entry["accuracy"] is not None:
                accuracy.add_metric(key, entry["accuracy"])
                f1.add_metric(key, entry["f1_macro"])
            lag.add_metric([*key, "0.5"], entry["lag_p50"])
            lag.add_metric([*key, "0.9"], entry["lag_p90"])
            if entry["holdout_accuracy"] is not None:
                holdout.add_metric(key, entry["holdout_accuracy"])
                if entry["labelled_rows"] >= self.min_labels:
                    floor.add_metric(key, entry["holdout_accuracy"] - self.alert_drop)
        yield from (accuracy, f1, labelled, lag, holdout, floor)
