"""Drift reports from the prediction log: `/drift`'s JSON for the rows a version answered, over any period.

Needs `PREDICTION_LOG_INPUTS=true` while the rows were answered (the log keeps no inputs otherwise). The rows
are counted exactly as the live counter counts them (`serving.drift_counts.row_cells`, the same cells) against
the version's registered baseline, so a report over the rows `/drift` counted gives the same figures. Routes:
the ones drift counts (the active version, both arms of a rollout, and a candidate's fallbacks, which the stable
version answered); `--route` picks others (`version` and `alias`: answers asked for by URL). A shadow's scoring
is not logged, so a shadow candidate has no rows here. Features left out by `PREDICTION_LOG_EXCLUDE` are listed
under `not_logged`, without figures.

    python -m serving.drift report --model NAME --version N [--since 2026-12-01T00:00 or 7d] [--until ...]
        [--baseline extra_files/baseline.json] [--route stable ...]

The database is the service's (`PREDICTION_LOG_URL`, or the SQLite file beside the embedded store); the baseline
comes from the registry (`MLFLOW_TRACKING_URI`) unless `--baseline` names the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from kernel.drift_format import Baseline, parse_baseline, read_baseline
from serving.drift_counts import row_cells
from serving.drift_figures import report

COUNTED_ROUTES = ("active", "stable", "candidate", "fallback")
CHUNK = 5_000


def logged_rows(engine, name: str, version: str, since=None, until=None, routes=COUNTED_ROUTES):
    """(inputs as a dict or None, predicted label) of the version's logged rows, oldest first, in chunks."""
    import sqlalchemy as sa

    from kernel.prediction_db import predictions as table

    query = sa.select(table.c.inputs, table.c.prediction).where(
        table.c.model == name, table.c.version == str(version), table.c.route.in_(routes)
    )
    if since is not None:
        query = query.where(table.c.created_at >= since)
    if until is not None:
        query = query.where(table.c.created_at < until)
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(query.order_by(table.c.created_at))
        for chunk in result.partitions(CHUNK):
            yield [(json.loads(row.inputs) if row.inputs else None, row.prediction) for row in chunk]


def count_rows(baseline: Baseline, chunks) -> tuple[int, np.ndarray, int, set[str]]:
    """(rows counted, cell counts, rows without inputs, features never logged) over the chunks of logged rows."""
    counts, rows, without, seen = np.zeros(baseline.cells, dtype=np.int64), 0, 0, set()
    names = [cells.name for cells in baseline.features]
    for chunk in chunks:
        logged = [(inputs, label) for inputs, label in chunk if inputs is not None]
        without += len(chunk) - len(logged)
        if not logged:
            continue
        for inputs, _ in logged:
            seen.update(inputs)
        columns = {name: [inputs.get(name) for inputs, _ in logged] for name in names}
        cells, counted = row_cells(baseline, columns, [label for _, label in logged], len(logged))
        counts += np.bincount(cells, minlength=baseline.cells)
        rows += counted
    return rows, counts, without, set(names) - seen if rows else set()


def drift_from_log(engine, baseline: Baseline, name: str, version: str, since=None, until=None,
                   routes=COUNTED_ROUTES, min_rows: int = 500, warn: float = 0.1, alert: float = 0.25) -> dict:  # fmt: skip
    """The version's /drift entry for its logged rows (`scope`: `prediction_log`)."""
    rows, counts, without, not_logged = count_rows(baseline, logged_rows(engine, name, version, since, until, routes))
    entry = report(baseline, rows, counts, min_rows, warn, alert)
    entry["features"] = [f for f in entry["features"] if f["name"] not in not_logged]
    if "prediction" in entry:  # the status of what was logged: a feature never logged reads as all missing
        levels = {f["level"] for f in entry["features"]} | {entry["prediction"]["level"]}
        entry["status"] = "alert" if "alert" in levels else "warn" if "warn" in levels else "ok"
    period = {"since": since.isoformat() if since else None, "until": until.isoformat() if until else None}
    return {"name": name, "version": str(version), "scope": "prediction_log", "routes": list(routes), **period,
            **entry, "rows_without_inputs": without, "not_logged": sorted(not_logged)}  # fmt: skip


def _baseline(args, settings) -> Baseline:
    if args.baseline:
        return parse_baseline(Path(args.baseline).read_bytes())
    from kernel.registry import ModelRef, registry_from_settings

    registry = registry_from_settings(settings)
    with tempfile.TemporaryDirectory(prefix="drift-report-") as folder:
        path = registry.download_model_version(ModelRef(args.model, str(args.version)), Path(folder))
        baseline, reason = read_baseline(path)
    if baseline is None:
        raise SystemExit(f"{args.model} version {args.version}: no drift baseline ({reason})")
    return baseline


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:  # the Lambda environments' raw count lines (serving/drift_emf.py)
        from serving.drift_emf import main as merge_main

        return merge_main(argv)
    from kernel.prediction_db import log_time  # SQLAlchemy: not needed by `merge` (the Lambda package has none)

    parser = argparse.ArgumentParser(prog="python -m serving.drift", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    reporting = commands.add_parser("report", help="/drift's JSON for a version's rows in the prediction log")
    reporting.add_argument("--model", required=True)
    reporting.add_argument("--version", required=True)
    reporting.add_argument(
        "--since", type=log_time, help="ISO time (UTC unless it says otherwise), or 7d, 12h, 30m back"
    )
    reporting.add_argument("--until", type=log_time, help="ISO time, excluded")
    reporting.add_argument("--baseline", help="the version's extra_files/baseline.json (default: from the registry)")
    reporting.add_argument("--route", action="append", help=f"routes to count (default: {', '.join(COUNTED_ROUTES)})")
    commands.add_parser("merge", help="sum raw drift count lines (CloudWatch Logs export): merge --help")
    args = parser.parse_args(argv)
    from kernel.config import settings_or_exit
    from kernel.prediction_db import database_url, make_engine

    settings = settings_or_exit()
    baseline = _baseline(args, settings)
    engine = make_engine(database_url(settings))
    limits = (settings.DRIFT_MIN_ROWS, settings.DRIFT_PSI_WARN, settings.DRIFT_PSI_ALERT)
    entry = drift_from_log(engine, baseline, args.model, args.version, args.since, args.until,
                           tuple(args.route or COUNTED_ROUTES), *limits)  # fmt: skip
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
