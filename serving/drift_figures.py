"""Drift's figures for one version, from its merged counts and its baseline (`report`).

Distances, not p-values, so a large window does not flag every column: PSI and the Jensen-Shannon distance
(base 2, 0 to 1) on smoothed fractions (count + 0.5) / (n + 0.5 * cells). A level is `warn` above the warn
PSI and `alert` above the alert PSI, and never below 3 x the noise floor, the PSI expected with no drift at
these sizes: (cells - 1) x (1 / window rows + 1 / reference rows). numpy only (the compiled-only Lambda
package has no scipy).
"""

from __future__ import annotations

import numpy as np

from kernel.drift_format import Baseline

SMOOTHING = 0.5


def fractions(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + SMOOTHING) / (counts.sum() + SMOOTHING * counts.size)


def distances(live: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """PSI and the Jensen-Shannon distance (base 2) between two count vectors over the same cells."""
    p, q = fractions(live), fractions(reference)
    psi = float(np.sum((p - q) * np.log(p / q)))
    m = (p + q) / 2
    divergence = 0.5 * float(np.sum(p * np.log2(p / m))) + 0.5 * float(np.sum(q * np.log2(q / m)))
    return psi, float(np.sqrt(max(divergence, 0.0)))


def noise_floor(cells: int, live_rows: int, reference_rows: int) -> float:
    """The PSI expected between two samples of one distribution at these sizes."""
    return (cells - 1) * (1 / max(live_rows, 1) + 1 / max(reference_rows, 1))


def level(psi: float, noise: float, warn: float, alert: float) -> str:
    if psi > max(alert, 3 * noise):
        return "alert"
    if psi > max(warn, 3 * noise):
        return "warn"
    return "ok"


def _shares(counts: np.ndarray, keys) -> dict:
    total = counts.sum()
    return {str(key): round(float(c / total), 6) if total else 0.0 for key, c in zip(keys, counts)}


def _feature_report(cells, live: np.ndarray, rows: int, limits) -> dict:
    counts = live[cells.offset : cells.offset + cells.size]
    psi, js = distances(counts, cells.reference)
    noise = noise_floor(cells.size, rows, int(cells.reference.sum()))
    entry = {
        "name": cells.name, "kind": cells.kind, "psi": round(psi, 6), "js": round(js, 6), "noise": round(noise, 6),
        "level": level(psi, noise, *limits),
        "missing": {"live": round(float(counts[-1] / max(rows, 1)), 6),
                    "reference": round(float(cells.reference[-1] / max(cells.reference.sum(), 1)), 6)},
    }  # fmt: skip
    if cells.kind == "number":
        flagged = live[cells.offset + cells.size : cells.offset + cells.size + 2].sum()
        entry["out_of_range"] = round(float(flagged / max(rows, 1)), 6)
    return entry


def report(baseline: Baseline, rows: int, live: np.ndarray, min_rows: int, warn: float, alert: float) -> dict:
    """/drift's entry for one version from its merged counts: distances and rates, never edges or values."""
    entry = {"rows": rows, "baseline": {"sha256": baseline.sha256, "rows": baseline.rows,
                                        "holdout_rows": baseline.holdout_rows}}  # fmt: skip
    if rows < min_rows:
        return {**entry, "status": "insufficient_data", "min_rows": min_rows, "features": []}
    limits = (warn, alert)
    features = sorted((_feature_report(c, live, rows, limits) for c in baseline.features), key=lambda f: -f["psi"])
    predicted = live[baseline.prediction_offset : baseline.prediction_offset + len(baseline.classes)]
    psi, js = distances(predicted, baseline.prediction_reference)
    noise = noise_floor(len(baseline.classes), int(predicted.sum()), baseline.holdout_rows)
    prediction = {"psi": round(psi, 6), "js": round(js, 6), "noise": round(noise, 6), "level": level(psi, noise, *limits),
                  "live": _shares(predicted, baseline.classes),
                  "reference": _shares(baseline.prediction_reference, baseline.classes)}  # fmt: skip
    levels = {f["level"] for f in features} | {prediction["level"]}
    status = "alert" if "alert" in levels else "warn" if "warn" in levels else "ok"
    return {**entry, "status": status, "prediction": prediction, "features": features}
