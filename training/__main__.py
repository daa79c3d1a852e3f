"""`python -m training ...`: one training job from the command line (a batch job, AWS Batch, SageMaker).

    python -m training --estimator SVC --params '{"C": 2.0}' --dataset wine
    python -m training --estimator RandomForestClassifier --csv data.csv --target label --model-name churn
    python -m training replay --model churn --candidate 4 --since 2026-12-01   (training/replay.py)

It validates like POST /train, trains, registers a new version in MLFLOW_TRACKING_URI, activates it
unless --no-activate, and prints the result as JSON. Exit code 0 on success, 2 on a bad request,
1 on a failed job (nothing registered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["replay"]:  # python -m training replay --model NAME --candidate VERSION (training/replay.py)
        from training.replay import main as replay

        return replay(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m training", description="Train and register one model.")
    parser.add_argument("--estimator", required=True, help="e.g. RandomForestClassifier, SVC, LogisticRegression")
    parser.add_argument("--params", default="{}", help="hyperparameters as a JSON object")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a built-in dataset: iris, wine, breast_cancer, digits")
    source.add_argument("--csv", type=Path, help="a CSV file with a header row")
    parser.add_argument("--target", help="the CSV column holding the class labels")
    parser.add_argument("--model-name", help="registered model name (default: <dataset>-<estimator>)")
    parser.add_argument("--no-activate", action="store_true", help="register without making it active")
    args = parser.parse_args(argv)

    from kernel.config import settings_or_exit
    from kernel.registry import registry_from_settings
    from training.run import run_training
    from training.schemas import InvalidTrainingRequest, parse_train_request

    settings = settings_or_exit()  # an invalid setting: one line on stderr, exit 2
    body = {"estimator": args.estimator, "params": args.params, "activate": not args.no_activate}
    for key, value in (("dataset", args.dataset), ("target", args.target), ("model_name", args.model_name)):
        if value:
            body[key] = value
    limits = {"max_rows": settings.TRAIN_MAX_ROWS, "max_columns": settings.TRAIN_MAX_COLUMNS}
    try:
        upload = (args.csv.read_bytes(), args.csv.name) if args.csv else None
        parsed = parse_train_request(body, limits, upload)
    except InvalidTrainingRequest as exc:
        print(json.dumps({"error": "invalid_training_request", "errors": exc.errors}, indent=2), file=sys.stderr)
        return 2
    except OSError as exc:
        print(json.dumps({"error": "invalid_training_request", "errors": {"csv": [str(exc)]}}), file=sys.stderr)
        return 2

    from training.datasets import load_builtin

    dataset = load_builtin(parsed.dataset) if isinstance(parsed.dataset, str) else parsed.dataset
    registry = registry_from_settings(settings)
    try:
        # MLflow prints progress ("View run at ...") to stdout: keep stdout for the JSON result alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = run_training(registry, parsed.spec, dataset)
    except Exception as exc:  # a failed job: report it; run_training registered nothing
        print(json.dumps({"error": "training_failed", "message": f"{type(exc).__name__}: {exc}"}), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
