"""The default model a fresh install serves: a RandomForest on scikit-learn's iris data."""

from __future__ import annotations

from kernel.registry import ModelRef, Registry
from training.datasets import load_builtin
from training.run import run_training
from training.spec import TrainingSpec


def bootstrap_default_model(registry: Registry, model_name: str) -> ModelRef:
    """Train, register and activate the default model; returns its version."""
    result = run_training(registry, TrainingSpec("RandomForestClassifier", model_name=model_name), load_builtin("iris"))
    return ModelRef(**result["model"])
