"""The plots every training run logs to MLflow: confusion matrix, ROC curves, feature importances."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")  # files only: no display, safe in a job process

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.inspection import permutation_importance  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import label_binarize  # noqa: E402

log = logging.getLogger(__name__)

CONFUSION_MATRIX = "confusion_matrix.png"
ROC_CURVE = "roc_curve.png"
FEATURE_IMPORTANCES = "feature_importances.png"
TOP_FEATURES = 20
# Permutation importances cost n_repeats predictions per column: bounded so a job stays quick.
PERMUTATION_REPEATS = 5
PERMUTATION_MAX_ROWS = 2000
PERMUTATION_MAX_COLUMNS = 100


def _log(figure, name: str) -> None:
    figure.tight_layout()
    mlflow.log_figure(figure, name)
    plt.close(figure)


def log_confusion_matrix(matrix, classes) -> None:
    size = max(4.0, 0.5 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=axes, colorbar=False, xticks_rotation=45)
    axes.set_title("Confusion matrix (hold-out split)")
    _log(figure, CONFUSION_MATRIX)


def _scores(model: Pipeline, features: pd.DataFrame) -> np.ndarray | None:
    """Per-class scores (probabilities, or decision values), shape (n_rows, n_classes); None if neither."""
    if hasattr(model, "predict_proba"):
        return model.predict_proba(features)
    if hasattr(model, "decision_function"):
        scores = model.decision_function(features)
        return np.column_stack([-scores, scores]) if scores.ndim == 1 else scores
    return None


def log_roc_curve(model: Pipeline, features: pd.DataFrame, labels: pd.Series) -> bool:
    """ROC on the hold-out rows: one curve for two classes, one-vs-rest curves for more."""
    classes = list(model.classes_)
    scores = _scores(model, features)
    if scores is None:
        return False
    figure, axes = plt.subplots(figsize=(6, 6))
    if len(classes) == 2:
        RocCurveDisplay.from_predictions(labels, scores[:, 1], pos_label=classes[1], ax=axes, name=str(classes[1]))
        axes.set_title(f"ROC curve (positive class: {classes[1]})")
    else:
        truth = label_binarize(labels, classes=classes)
        for index, label in enumerate(classes):
            if truth[:, index].any() and not truth[:, index].all():
                RocCurveDisplay.from_predictions(truth[:, index], scores[:, index], ax=axes, name=f"{label} vs rest")
        axes.set_title("ROC curves, one class against the rest")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    _log(figure, ROC_CURVE)
    return True


def _importances(model: Pipeline, features: pd.DataFrame, labels: pd.Series) -> tuple[pd.Series, str] | None:
    """The estimator's own importances (per encoded column), else permutation importances per raw column."""
    estimator = model[-1]
    if hasattr(estimator, "feature_importances_"):
        names = model[:-1].get_feature_names_out()
        names = [name.split("__", 1)[-1] for name in names]  # "numeric__seats" -> "seats"
        return pd.Series(estimator.feature_importances_, index=names), "impurity-based importance"
    if features.shape[1] > PERMUTATION_MAX_COLUMNS:
        return None
    sample = features.sample(min(len(features), PERMUTATION_MAX_ROWS), random_state=0)
    result = permutation_importance(
        model, sample, labels.loc[sample.index], n_repeats=PERMUTATION_REPEATS, random_state=0, n_jobs=1
    )
    return pd.Series(result.importances_mean, index=list(features.columns)), "permutation importance (hold-out)"


def log_feature_importances(model: Pipeline, features: pd.DataFrame, labels: pd.Series) -> bool:
    found = _importances(model, features, labels)
    if found is None:
        return False
    importances, kind = found
    top = importances.sort_values(ascending=True).tail(TOP_FEATURES)
    figure, axes = plt.subplots(figsize=(7, max(3.0, 0.3 * len(top) + 1.5)))
    axes.barh([str(name) for name in top.index], top.values)
    axes.set_xlabel(kind)
    axes.set_title(f"Feature importances (top {len(top)})")
    _log(figure, FEATURE_IMPORTANCES)
    return True


def log_plots(model: Pipeline, features: pd.DataFrame, labels: pd.Series, evaluation: dict) -> list[str]:
    """Log every plot that applies to this run; returns the artifact names logged."""
    log_confusion_matrix(evaluation["confusion_matrix"], evaluation["classes"])
    logged = [CONFUSION_MATRIX]
    if log_roc_curve(model, features, labels):
        logged.append(ROC_CURVE)
    if log_feature_importances(model, features, labels):
        logged.append(FEATURE_IMPORTANCES)
    return logged
