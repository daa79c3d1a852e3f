"""What a client asked to train, already validated: the estimator, its parameters, where the model goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.datasets import Dataset


@dataclass
class TrainingSpec:
    """What a client asked for, already validated: estimator, its parameters, where the model goes."""

    estimator: str
    params: dict = field(default_factory=dict)
    model_name: str | None = None
    activate: bool = True

    def resolved_model_name(self, dataset: Dataset) -> str:
        """The client's name, or one derived from dataset and estimator ("wine-SVC")."""
        return self.model_name or f"{dataset.name}-{self.estimator}"


# A POST /train body that works as-is: the example of every training error and of the OpenAPI document.
EXAMPLE_REQUEST = {"estimator": "RandomForestClassifier", "params": {"n_estimators": 200}, "dataset": "wine"}
