"""Training: estimators, datasets and the job that fits, evaluates and registers a model."""
