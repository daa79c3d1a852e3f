"""What the prediction log costs a request (the request-path part: ids and the queued row) and the writer per row.

    .venv/bin/python scripts/prediction_log_cost.py

Measured in CPU time (the request's own thread for `record`, the whole process for the writer), so another
load on the machine moves it less than wall time would. Compare with a one-row /predict's server time (README, Performance).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel.config import load_settings  # noqa: E402
from serving.prediction_log import PredictionLog  # noqa: E402


def answer(rows: int) -> dict:
    probabilities = {"setosa": 0.9, "versicolor": 0.1, "virginica": 0.0}
    return {"model": {"runtime": "onnx"}, "predictions": ["setosa"] * rows, "probabilities": [probabilities] * rows}


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="prediction-log-cost-"))
    settings = load_settings({"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "STATE_DIR": str(folder),
                              "PREDICTION_LOG_QUEUE": 10_000_000})  # fmt: skip
    log = PredictionLog(settings)
    log.start(settings)
    model = SimpleNamespace(ref=SimpleNamespace(name="iris", version="1"), baseline=None)
    for rows, calls in ((1, 20_000), (10_000, 20)):
        answers = [answer(rows) for _ in range(calls)]
        started = time.thread_time()  # this thread only: the writer thread's inserts are not the request's
        for result in answers:
            log.record("request-id", model, "active", result)
        per_call = (time.thread_time() - started) / calls
        print(f"record(): {rows:>6} rows per request: {per_call * 1e6:9.1f} µs CPU per request")
    queued = 20_000 + 20 * 10_000
    started, wall = time.process_time(), time.monotonic()
    log.flush(timeout=600)
    print(
        f"writer (SQLite, statements of 1,000 rows): {queued} rows in {time.monotonic() - wall:.1f} s wall, "
        f"{(time.process_time() - started) / queued * 1e6:.1f} µs CPU per row"
    )


if __name__ == "__main__":
    main()
