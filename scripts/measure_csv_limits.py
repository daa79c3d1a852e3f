"""How long an over-wide or over-long CSV upload holds a worker before POST /train refuses it.

Run: .venv/bin/python scripts/measure_csv_limits.py [--repeat 3]
It builds the app on a temporary MLflow store (no model loaded: the timings are of /train alone) and
posts, through Flask's test client as a multipart upload with the token, a CSV with 300,001 columns
(3 rows, about 3.3 MB) and one with 1,000,000 rows (about 4 MB), both under the 6 MB body limit,
and prints the status, the error and the median wall time of each. The limits are the defaults
(TRAIN_MAX_COLUMNS 200, TRAIN_MAX_ROWS 50,000).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TOKEN = "measure-csv-limits"


def wide_csv(columns: int = 300_000, rows: int = 3) -> bytes:
    header = ",".join(f"c{i}" for i in range(columns)) + ",label\n"
    row = "1," * columns + "a\n"
    return (header + row * rows).encode()


def long_csv(rows: int = 1_000_000) -> bytes:
    return ("x,label\n" + "1,a\n2,b\n" * (rows // 2)).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from service import create_app

    with tempfile.TemporaryDirectory() as folder:
        config = {
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
            "STATE_DIR": f"{folder}/state",
            "API_TOKEN": TOKEN,
            "START_MODEL_STORE": False,
            "WATCH_REGISTRY": False,
        }
        client = create_app(config).test_client()
        for name, content in (("300,001 columns", wide_csv()), ("1,000,001 rows", long_csv())):
            times, answer = [], None
            for _ in range(args.repeat):
                data = {"file": (io.BytesIO(content), "upload.csv"), "target": "label", "estimator": "GaussianNB"}
                start = time.perf_counter()
                answer = client.post("/train", data=data, content_type="multipart/form-data",
                                     headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
                times.append(time.perf_counter() - start)
            error = (answer.json or {}).get("errors", answer.json)
            print(f"{name} ({len(content) / 1e6:.1f} MB): {answer.status_code} {error}")
            print(f"    median {statistics.median(times):.3f} s, best {min(times):.3f} s of {args.repeat}")


if __name__ == "__main__":
    main()
