"""Time a 10,000-row POST /predict next to scikit-learn's own predict_proba on the same rows.

Run: make bench   (or .venv/bin/python scripts/bench_predict.py --rows 10000 --repeat 20)
It builds the app on a temporary MLflow store (bootstrapping the default RandomForest on iris),
then times, on the same rows: the whole request through Flask's test client (JSON parsing,
validation, prediction, JSON answer), its steps one by one (orjson parse, column checks, the ONNX
Runtime call with its input arrays, the answer's encoding), marshmallow row-by-row validation (what
the fast path avoids), and scikit-learn's own json.loads + DataFrame + predict_proba on the same body.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def timed(function, repeat: int) -> tuple[float, float]:
    """Median and best wall time in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import numpy as np
    import orjson
    import pandas as pd

    from service import create_app
    from serving.prediction import parse_rows, predict, probabilities_of, validate_rows
    from training.datasets import load_builtin

    folder = tempfile.mkdtemp(prefix="bench-")
    app = create_app({"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "WATCH_REGISTRY": False})
    model = app.extensions["model_store"].get()
    iris = load_builtin("iris").features
    rng = np.random.default_rng(0)
    rows = iris.sample(args.rows, replace=True, random_state=0).reset_index(drop=True)
    rows = (rows + rng.normal(0, 0.05, rows.shape)).round(3)
    records = rows.to_dict(orient="records")
    body = json.dumps({"records": records})
    client = app.test_client()
    assert client.post("/predict", data=body, content_type="application/json").status_code == 200

    parsed = orjson.loads(body)
    checked, key = parse_rows(parsed, model.feature_names)
    columns = validate_rows(model, checked, key, 10**6)
    answer = predict(model, parsed, 10**6)
    results = {
        f"POST /predict, whole request (test client, runtime {model.runtime})": timed(
            lambda: client.post("/predict", data=body, content_type="application/json"), args.repeat
        ),
        "  orjson parse of the body": timed(lambda: orjson.loads(body), args.repeat),
        "  column checks (types, float32 range)": timed(
            lambda: validate_rows(model, parse_rows(parsed, model.feature_names)[0], key, 10**6), args.repeat
        ),
        "  runtime call with its input arrays": timed(lambda: probabilities_of(model, columns, key), args.repeat),
        "  answer encoded (orjson)": timed(lambda: orjson.dumps(answer), args.repeat),
        "  marshmallow row by row (avoided)": timed(
            lambda: model.schema.load(records, many=True), max(3, args.repeat // 4)
        ),
        "scikit-learn: json.loads + DataFrame + predict_proba": timed(
            lambda: model.estimator.predict_proba(pd.DataFrame(json.loads(body)["records"])), args.repeat
        ),
        "  of which predict_proba on a ready DataFrame": timed(
            lambda: model.estimator.predict_proba(rows), args.repeat
        ),
    }
    import platform

    import sklearn

    print(f"{args.rows} rows, {model.ref.name} v{model.ref.version} ({type(model.estimator[-1]).__name__}), "
          f"median of {args.repeat}; Python {platform.python_version()}, scikit-learn {sklearn.__version__}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    for name, (median, best) in results.items():
        print(f"{name:45s} median {median:8.1f} ms   best {best:8.1f} ms")


if __name__ == "__main__":
    main()
