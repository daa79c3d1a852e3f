"""Replay: would another version have done better on the traffic a model really served?

    python -m training replay --model NAME --candidate VERSION [--since ISO time or 7d] [--until ISO time]

Scores the model's logged rows (their inputs recorded: PREDICTION_LOG_INPUTS) with the candidate version,
offline, and prints as JSON how often it agrees with what was served, and, on the rows whose label came back,
the accuracy of what was served against the candidate's. Rows the candidate itself answered (a canary's share)
are left out. It reads the prediction log (`PREDICTION_LOG_URL`, or the SQLite file beside the embedded store)
and the registry (`MLFLOW_TRACKING_URI`). Exit code 0, or 2 with a one-line reason (no rows, no inputs, the
candidate needs features the log does not hold).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path


class ReplayError(ValueError):
    """Why there is nothing to replay (the message is the answer)."""


def logged_rows(engine, model: str, candidate: str, since=None, until=None) -> list:
    """The model's logged rows with inputs that another version answered: (inputs, served version, served, label)."""
    import sqlalchemy as sa

    from kernel.prediction_db import predictions as table

    query = sa.select(table.c.inputs, table.c.version, table.c.prediction, table.c.label).where(
        table.c.model == model, table.c.version != str(candidate), table.c.inputs.is_not(None)
    )
    if since is not None:
        query = query.where(table.c.created_at >= since)
    if until is not None:
        query = query.where(table.c.created_at < until)
    with engine.connect() as connection:
        return [(json.loads(r.inputs), r.version, r.prediction, r.label) for r in connection.execute(query)]


def load_pipeline(registry, model: str, version: str):
    """The version's scikit-learn pipeline from its skops file, with the service's trusted types (never pickle)."""
    import skops.io
    import yaml

    from kernel.refs import ModelRef
    from kernel.trusted_types import TRUSTED_TYPES

    with tempfile.TemporaryDirectory(prefix="replay-") as folder:
        path = registry.download_model_version(ModelRef(model, str(version)), Path(folder))
        flavor = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["sklearn"]
        return skops.io.load(path / flavor["pickled_model"], trusted=TRUSTED_TYPES)


def replay(rows: list, pipeline) -> dict:
    """Agreement with what was served, and both accuracies on the labelled rows."""
    import pandas as pd

    from training.datasets import typed_features

    if not rows:
        raise ReplayError("no logged rows with inputs to replay (PREDICTION_LOG_INPUTS=true records them)")
    frame = pd.DataFrame.from_records([inputs for inputs, _, _, _ in rows])
    needed = list(getattr(pipeline, "feature_names_in_", frame.columns))
    missing = sorted(set(needed) - set(frame.columns))
    if missing:
        raise ReplayError(f"the candidate needs features the log does not hold: {missing} (PREDICTION_LOG_EXCLUDE?)")
    try:
        replayed = [str(label) for label in pipeline.predict(typed_features(frame[needed]))]
    except Exception as exc:  # rows the candidate cannot score (another feature set's values, say)
        raise ReplayError(f"the candidate cannot score the logged rows: {exc}") from exc
    served = [prediction for _, _, prediction, _ in rows]
    labelled = [(index, label) for index, (_, _, _, label) in enumerate(rows) if label is not None]
    answer = {"rows": len(rows), "served_versions": dict(Counter(version for _, version, _, _ in rows)),
              "agreement": round(sum(a == b for a, b in zip(served, replayed)) / len(rows), 6),
              "labelled_rows": len(labelled), "accuracy": None}  # fmt: skip
    if labelled:
        answer["accuracy"] = {
            "served": round(sum(served[i] == label for i, label in labelled) / len(labelled), 6),
            "candidate": round(sum(replayed[i] == label for i, label in labelled) / len(labelled), 6),
        }
    return answer


def main(argv: list[str] | None = None) -> int:
    from kernel.prediction_db import log_time

    parser = argparse.ArgumentParser(prog="python -m training replay", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--candidate", required=True, help="the version to score the logged rows with")
    parser.add_argument("--since", type=log_time, help="ISO time (UTC unless it says otherwise), or 7d, 12h, 30m back")
    parser.add_argument("--until", type=log_time, help="ISO time, excluded")
    args = parser.parse_args(argv)

    from kernel.config import settings_or_exit
    from kernel.prediction_db import database_url, make_engine
    from kernel.registry import registry_from_settings

    settings = settings_or_exit()
    engine = make_engine(database_url(settings))
    try:
        rows = logged_rows(engine, args.model, args.candidate, args.since, args.until)
        try:
            pipeline = load_pipeline(registry_from_settings(settings), args.model, args.candidate)
        except Exception as exc:  # not registered, no skops file, the registry away
            raise ReplayError(f"{args.model} version {args.candidate} cannot be loaded: {exc}") from exc
        result = replay(rows, pipeline)
    except ReplayError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(json.dumps({"model": args.model, "candidate": str(args.candidate), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
