"""What drift counting costs per request, in process: predict() with and without it, and observe() alone.

Run: PYTHONPATH=. .venv/bin/python scripts/drift_cost.py  (serves the default model of the embedded store).
The minimum of several repeats: the least noisy figure on a shared machine.
"""

import tempfile
import timeit

from service import create_app
from serving.prediction import fast_columns, predict

IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}


def best(function, number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=7)) / number


def main() -> None:
    folder = tempfile.mkdtemp(prefix="drift-cost-")
    app = create_app({"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "STATE_DIR": f"{folder}/state",
                      "WATCH_REGISTRY": False, "LOG_LEVEL": "warning"})  # fmt: skip
    model, drift = app.extensions["model_store"].get(), app.extensions["drift"]
    print(
        f"{model.ref.name} version {model.ref.version}, runtime {model.runtime}, baseline: {model.baseline is not None}"
    )
    for rows in (1, 10_000):
        body = IRIS_ROW if rows == 1 else {"records": [IRIS_ROW] * rows}
        number = 20_000 if rows == 1 else 10
        off = best(lambda: predict(model, body, 50_000), number)  # noqa: B023
        # Counted, not just queued: the flush the flusher thread would do, right after each request.
        on = best(lambda: (predict(model, body, 50_000, drift.observe), drift.flush()), number)  # noqa: B023
        columns = fast_columns(model, [IRIS_ROW] * rows)
        labels = ["setosa"] * rows
        alone = best(lambda: (drift.observe(model, columns, labels), drift.flush()), number)  # noqa: B023
        print(f"{rows:>6} rows: predict() {off * 1e6:9.1f} us, with drift {on * 1e6:9.1f} us "
              f"(+{(on / off - 1) * 100:.1f} %); observe() and its flush alone {alone * 1e6:.1f} us")  # fmt: skip
    # A one-row request is only queued; the flusher counts the queue every 0.2 s. Per request, both together, for
    # as many requests as one worker answers in 0.2 s under make bench's load (about 250).
    columns, labels = fast_columns(model, [IRIS_ROW]), ["setosa"]

    def queued_then_flushed() -> None:
        for _ in range(250):
            drift.observe(model, columns, labels)
        drift.flush()

    print(f"     1 row, queued then flushed with 249 others: {best(queued_then_flushed, 20) / 250 * 1e6:.2f} us")


if __name__ == "__main__":
    main()
