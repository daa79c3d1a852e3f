"""Drift on Lambda: each environment is one process, so it reports its own counts to CloudWatch, and a CLI sums them.

Every `EMIT_SECONDS` while an environment answers, it prints, per served version, one CloudWatch embedded
metric format (EMF) line with four metrics (the highest feature PSI, the features alerting, the prediction
PSI and the rows: four custom metrics, not one per feature), and one JSON line of its raw counts.
`python -m serving.drift_emf merge --baseline baseline.json < lines` sums the raw lines of many
environments (for one baseline) and prints /drift's entry for all of them together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from kernel.drift_format import parse_baseline

EMIT_SECONDS = 60.0
NAMESPACE = "ModelServing/Drift"
RAW_KEY = "drift_counts"


def emf_line(entry: dict, now: float) -> str:
    """One EMF line for a version's /drift entry (CloudWatch turns its metrics into custom metrics)."""
    features = entry.get("features", [])
    values = {
        "DriftMaxFeaturePSI": max((f["psi"] for f in features), default=0.0),
        "DriftFeaturesAlerting": sum(f["level"] == "alert" for f in features),
        "DriftPredictionPSI": entry.get("prediction", {}).get("psi", 0.0),
        "DriftRows": entry.get("rows", 0),
    }
    metrics = [{"Name": name, "Unit": "Count" if name in ("DriftRows", "DriftFeaturesAlerting") else "None"}
               for name in values]  # fmt: skip
    document = {
        "_aws": {"Timestamp": int(now * 1000),
                 "CloudWatchMetrics": [{"Namespace": NAMESPACE, "Dimensions": [["model", "version"]],
                                        "Metrics": metrics}]},  # fmt: skip
        "model": entry["name"], "version": entry["version"], "status": entry.get("status"), **values,
    }  # fmt: skip
    return json.dumps(document, separators=(",", ":"))


def raw_line(name: str, version: str, sha256: str, rows: int, counts: np.ndarray, window: int) -> str:
    return json.dumps({RAW_KEY: {"model": name, "version": version, "sha256": sha256, "window_seconds": window,
                                 "rows": rows, "counts": counts.tolist()}}, separators=(",", ":"))  # fmt: skip


class Emitter:
    """Prints the lines at most every EMIT_SECONDS, from the request that finds the interval passed."""

    def __init__(self, monitor, out=None):
        self.monitor = monitor
        self.out = out
        self.last = time.monotonic()

    def maybe_emit(self, models) -> bool:
        if time.monotonic() - self.last < EMIT_SECONDS:
            return False
        self.last = time.monotonic()
        out = self.out or sys.stdout
        window = self.monitor.window
        for model in models:
            if model.baseline is None:
                continue
            entry, rows, counts = self.monitor.version_counts(model, window)
            print(emf_line(entry, time.time()), file=out, flush=True)
            print(raw_line(model.ref.name, model.ref.version, model.baseline.sha256, rows, counts, window),
                  file=out, flush=True)  # fmt: skip
        return True


def merge(lines, baseline_text: bytes, min_rows: int = 500, warn: float = 0.1, alert: float = 0.25) -> dict:
    """/drift's entry for the raw count lines of many environments that match the baseline."""
    from serving.drift_figures import report

    baseline = parse_baseline(baseline_text)
    rows, counts, environments = 0, np.zeros(baseline.cells, dtype=np.int64), 0
    for line in lines:
        start = line.find("{")
        try:
            record = json.loads(line[start:]).get(RAW_KEY) if start >= 0 else None
        except ValueError:
            continue  # a log line of another kind
        if not record or record.get("sha256") != baseline.sha256:
            continue
        rows += int(record["rows"])
        counts += np.asarray(record["counts"], dtype=np.int64)
        environments += 1
    return {"environments": environments, **report(baseline, rows, counts, min_rows, warn, alert)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.drift", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merging = commands.add_parser("merge", help="sum raw drift count lines (CloudWatch Logs export) for one baseline")
    merging.add_argument("--baseline", required=True, help="the version's extra_files/baseline.json")
    merging.add_argument("files", nargs="*", help="log files (default: stdin)")
    merging.add_argument("--min-rows", type=int, default=500)
    args = parser.parse_args(argv)
    with open(args.baseline, "rb") as handle:
        baseline_text = handle.read()
    if args.files:
        lines = [line for path in args.files for line in Path(path).read_text(encoding="utf-8").splitlines()]
    else:
        lines = sys.stdin.readlines()
    print(json.dumps(merge(lines, baseline_text, args.min_rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
