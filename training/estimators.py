"""The estimators a client may train, each with a schema of the hyperparameters it may set."""

from __future__ import annotations

from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

# Bounds keep one job within minutes on a 2-core machine with the dataset caps of training.datasets.
SEED = fields.Integer(strict=True, validate=validate.Range(0, 2**32 - 1))
CLASS_WEIGHT = fields.String(validate=validate.OneOf(["balanced"]), allow_none=True)


def _trees(max_estimators: int) -> dict:
    return {
        "n_estimators": fields.Integer(strict=True, validate=validate.Range(1, max_estimators)),
        "max_depth": fields.Integer(strict=True, validate=validate.Range(1, 50), allow_none=True),
        "min_samples_split": fields.Integer(strict=True, validate=validate.Range(2, 1000)),
        "min_samples_leaf": fields.Integer(strict=True, validate=validate.Range(1, 1000)),
        "max_features": fields.String(validate=validate.OneOf(["sqrt", "log2"]), allow_none=True),
        "criterion": fields.String(validate=validate.OneOf(["gini", "entropy", "log_loss"])),
        "bootstrap": fields.Boolean(truthy={True}, falsy={False}),
        "class_weight": CLASS_WEIGHT,
        "random_state": SEED,
    }


def _tree() -> dict:
    params = _trees(1)
    for name in ("n_estimators", "bootstrap"):
        params.pop(name)
    return params


POSITIVE_C = fields.Float(validate=validate.Range(min=0, max=10_000, min_inclusive=False), allow_nan=False)

# name: (class, hyperparameter fields, values the service sets and the client may not)
ESTIMATORS: dict[str, tuple[type, dict, dict]] = {
    "RandomForestClassifier": (RandomForestClassifier, _trees(500), {"n_jobs": 1}),
    "ExtraTreesClassifier": (ExtraTreesClassifier, _trees(500), {"n_jobs": 1}),
    "GradientBoostingClassifier": (
        GradientBoostingClassifier,
        {
            "n_estimators": fields.Integer(strict=True, validate=validate.Range(1, 300)),
            "learning_rate": fields.Float(validate=validate.Range(0, 1, min_inclusive=False)),
            "max_depth": fields.Integer(strict=True, validate=validate.Range(1, 10)),
            "subsample": fields.Float(validate=validate.Range(0, 1, min_inclusive=False)),
            "min_samples_leaf": fields.Integer(strict=True, validate=validate.Range(1, 1000)),
            "random_state": SEED,
        },
        {},
    ),
    "HistGradientBoostingClassifier": (
        HistGradientBoostingClassifier,
        {
            "max_iter": fields.Integer(strict=True, validate=validate.Range(1, 500)),
            "learning_rate": fields.Float(validate=validate.Range(0, 1, min_inclusive=False)),
            "max_depth": fields.Integer(strict=True, validate=validate.Range(1, 50), allow_none=True),
            "max_leaf_nodes": fields.Integer(strict=True, validate=validate.Range(2, 255)),
            "l2_regularization": fields.Float(validate=validate.Range(0, 100)),
            "class_weight": CLASS_WEIGHT,
            "random_state": SEED,
        },
        {"early_stopping": False},
    ),
    "LogisticRegression": (
        LogisticRegression,
        {
            "C": POSITIVE_C,
            "max_iter": fields.Integer(strict=True, validate=validate.Range(1, 5000)),
            "solver": fields.String(validate=validate.OneOf(["lbfgs", "newton-cg", "sag", "saga"])),
            "tol": fields.Float(validate=validate.Range(min=0, max=1, min_inclusive=False)),
            "class_weight": CLASS_WEIGHT,
            "random_state": SEED,
        },
        {"max_iter": 1000},
    ),
    "SVC": (
        SVC,
        {
            "C": POSITIVE_C,
            "kernel": fields.String(validate=validate.OneOf(["linear", "poly", "rbf", "sigmoid"])),
            "degree": fields.Integer(strict=True, validate=validate.Range(1, 5)),
            "gamma": fields.String(validate=validate.OneOf(["scale", "auto"])),
            "max_iter": fields.Integer(strict=True, validate=validate.Range(1, 1_000_000)),
            "class_weight": CLASS_WEIGHT,
            "random_state": SEED,
        },
        {"max_iter": 1_000_000},
    ),
    "KNeighborsClassifier": (
        KNeighborsClassifier,
        {
            "n_neighbors": fields.Integer(strict=True, validate=validate.Range(1, 100)),
            "weights": fields.String(validate=validate.OneOf(["uniform", "distance"])),
            "p": fields.Integer(strict=True, validate=validate.Range(1, 2)),
        },
        {"n_jobs": 1},
    ),
    "DecisionTreeClassifier": (DecisionTreeClassifier, _tree(), {}),
    "GaussianNB": (
        GaussianNB,
        {"var_smoothing": fields.Float(validate=validate.Range(0, 1, min_inclusive=False))},
        {},
    ),
}
# Distance- and margin-based estimators need scaled features; trees do not.
NEEDS_SCALING = {"LogisticRegression", "SVC", "KNeighborsClassifier"}
# Seeded by default so that the same request trains the same model.
DEFAULT_SEED = 42
_SCHEMAS = {
    name: Schema.from_dict(params, name=f"{name}Params")(unknown=RAISE) for name, (_, params, _) in ESTIMATORS.items()
}


def validate_params(estimator: str, params: dict) -> dict:
    """The hyperparameters of a known estimator (the request schema checked the name and the object).

    Raises ValidationError.
    """
    try:
        return _SCHEMAS[estimator].load(params)
    except ValidationError as exc:
        raise ValidationError({"params": exc.messages}) from exc


def build_estimator(estimator: str, params: dict):
    """An unfitted estimator from validated parameters, with the values the service fixes."""
    cls, allowed, fixed = ESTIMATORS[estimator]
    settings = {**fixed, **params}
    if "random_state" in allowed and "random_state" not in settings:
        settings["random_state"] = DEFAULT_SEED
    if cls is SVC:
        # SVC(probability=True) is deprecated since scikit-learn 1.9; this is its documented replacement.
        return CalibratedClassifierCV(SVC(**settings), ensemble=False)
    return cls(**settings)


def describe_estimators() -> dict:
    """Each estimator's settable hyperparameters, with their type and bounds, for docs and errors."""
    return {name: sorted(params) for name, (_, params, _) in ESTIMATORS.items()}
