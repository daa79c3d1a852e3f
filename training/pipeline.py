"""The model a job fits: preprocessing for raw client columns, then the chosen estimator."""

from __future__ import annotations

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from training.estimators import DEFAULT_SEED, NEEDS_SCALING, build_estimator

TEST_SIZE = 0.25


def build_pipeline(features: pd.DataFrame, estimator_name: str, params: dict) -> Pipeline:
    """Numbers: median-imputed; text: most-frequent-imputed and one-hot encoded; then the estimator.

    The pipeline takes the raw columns, so `/predict` accepts the values the client trained on.
    """
    numeric = [c for c in features.columns if features[c].dtype.kind == "f"]
    text = [c for c in features.columns if c not in numeric]
    transformers = []
    if numeric:
        transformers.append(("numeric", SimpleImputer(strategy="median", keep_empty_features=True), numeric))
    if text:
        encode = Pipeline(
            [
                ("impute", SimpleImputer(strategy="most_frequent", keep_empty_features=True)),
                ("encode", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
            ]
        )
        transformers.append(("text", encode, text))
    steps = [("preprocess", ColumnTransformer(transformers, sparse_threshold=0))]
    if estimator_name in NEEDS_SCALING:
        steps.append(("scale", StandardScaler()))
    steps.append(("classifier", build_estimator(estimator_name, params)))
    return Pipeline(steps)


def split(features: pd.DataFrame, labels: pd.Series):
    """A stratified hold-out split, seeded so a job is repeatable."""
    return train_test_split(features, labels, test_size=TEST_SIZE, stratify=labels, random_state=DEFAULT_SEED)


def evaluate(model: Pipeline, features: pd.DataFrame, labels: pd.Series) -> dict:
    """Accuracy, macro F1, the per-class report and the confusion matrix on held-out rows."""
    predicted = model.predict(features)
    classes = list(model.classes_)
    return {
        "metrics": {
            "accuracy": float(accuracy_score(labels, predicted)),
            "f1_macro": float(f1_score(labels, predicted, average="macro")),
        },
        "report": classification_report(labels, predicted, output_dict=True, zero_division=0),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes),
        "classes": classes,
    }
