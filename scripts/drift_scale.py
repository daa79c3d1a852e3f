"""Issue 18's drift performance budget, measured at scale (200 features) in one process.

Run: PYTHONPATH=. .venv/bin/python scripts/drift_scale.py

1. Registration: training.baseline.baseline_bytes (what training/registration.py's log_model_version calls) on
   50,000 rows x 200 columns (150 numbers with 5 % missing, 40 texts of 30-80 values, 10 booleans): seconds
   (min of 3) and the baseline.json size. Budget: <= 1 s per job, <= 300 KB.
2. The count file of one process (serving.drift_counts.VersionCounts, 60 slots of 60 s, the default 3600 s
   window) for 200 text features of 50 kept values each. Budget: < 6 MB (6,000,000 bytes).
3. The drift part of a /metrics scrape: serving.drift_counts.merged over 4 workers' count files, then
   serving.drift_figures.report, as DriftCollector does for one version (median and max of 20). It is measured in
   one process with the files in the page cache, NOT an HTTP /metrics call: Flask, the gauge families and
   the exposition text are not included. Four workers are simulated by four files with fake pids, each
   holding 5,000 rows counted by row_cells + VersionCounts.add in batches of 100 over 50 slots.
   Budget: < 50 ms (for the whole /metrics answer).
4. Per-request counting cost at 200 features: small_cells / row_cells (and VersionCounts.add) for a one-row
   and a 1,000-row request (median). DriftMonitor.observe uses small_cells up to 32 rows, row_cells above.
   No budget was given for these: informational.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import pandas as pd

from kernel.drift_format import parse_baseline
from serving.drift_counts import VersionCounts, merged, row_cells, small_cells
from serving.drift_figures import report
from training.baseline import baseline_bytes

COMMAND = "PYTHONPATH=. .venv/bin/python scripts/drift_scale.py"
CLASSES = ["a", "b", "c"]
WINDOW, SLOT, WORKERS, WORKER_ROWS, BATCH = 3600, 60, 4, 5_000, 100
NOW = 1_000_000 * SLOT + 30.0


def texts(rng, rows: int, distinct: int, prefix: str) -> np.ndarray:
    """A text column of `distinct` values with Zipf-like frequencies and 3 % missing (None)."""
    weights = 1 / np.arange(1, distinct + 1)
    values = np.array([f"{prefix}_{k}" for k in range(distinct)], dtype=object)[
        rng.choice(distinct, rows, p=weights / weights.sum())
    ]
    values[rng.random(rows) < 0.03] = None
    return values


def mixed_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = {}
    for i in range(150):
        values = rng.poisson(3 + i % 5, rows).astype(float) if i % 10 == 0 else rng.normal(i, 1 + i % 7, rows)
        values[rng.random(rows) < 0.05] = np.nan
        data[f"num_{i:03d}"] = values
    for i in range(40):
        data[f"text_{i:02d}"] = texts(rng, rows, 30 + i * 50 // 39, f"t{i}")  # 30 to 80 distinct values
    for i in range(10):
        data[f"flag_{i}"] = rng.random(rows) < 0.2 + 0.06 * i
    return pd.DataFrame(data)


def text_frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({f"text_{i:03d}": texts(rng, rows, 60, f"t{i}") for i in range(200)})  # 50 kept + other


def labels(rows: int, seed: int) -> list:
    return np.random.default_rng(seed).choice(CLASSES, rows, p=[0.5, 0.3, 0.2]).tolist()


def columns_of(frame: pd.DataFrame) -> dict:
    """The columns as the service's validator hands them over: JSON values, None for missing."""
    return {name: [None if v is None or (isinstance(v, float) and v != v) else v for v in frame[name].tolist()]
            for name in frame.columns}  # fmt: skip


def write_workers(baseline, folder: Path, columns: dict, predicted: list) -> None:
    """WORKERS count files as gunicorn workers would leave them, under fake pids (900001...)."""
    for worker in range(WORKERS):
        scratch = tempfile.mkdtemp(dir=folder)
        counts = VersionCounts(baseline, SLOT, scratch)
        for number, start in enumerate(range(worker * WORKER_ROWS, (worker + 1) * WORKER_ROWS, BATCH)):
            batch = {name: values[start : start + BATCH] for name, values in columns.items()}
            counts.add(
                *row_cells(baseline, batch, predicted[start : start + BATCH], 1000), now=NOW - number % 50 * SLOT
            )
        counts.slots.flush()
        os.replace(counts.path, folder / f"drift_{baseline.sha256[:12]}_{900001 + worker}.counts")
        del counts
        shutil.rmtree(scratch)


def scrape_times(baseline, folder: Path) -> tuple[list[float], list[float]]:
    """Seconds of merged + report (20 times), and of merged alone."""
    total, alone = [], []
    for _ in range(20):
        start = time.perf_counter()
        rows, live = merged(baseline, WINDOW, SLOT, str(folder), None, now=NOW)
        middle = time.perf_counter()
        entry = report(baseline, rows, live, 500, 0.1, 0.25)
        total.append(time.perf_counter() - start)
        alone.append(middle - start)
    assert rows == WORKERS * WORKER_ROWS and len(entry["features"]) == 200, (rows, entry.get("status"))
    return total, alone


def per_call(function, number: int, repeat: int) -> float:
    return statistics.median(timeit.repeat(function, number=number, repeat=repeat)) / number


def yes(ok: bool) -> str:
    return "met" if ok else "**not met**"


def registration(table: list):
    """1. Registration: the baseline of 50,000 x 200 mixed columns; its rows go to `table`, the parsed baseline back."""
    train, holdout = mixed_frame(50_000, seed=1), labels(10_000, seed=2)
    seconds, content = [], b""
    for _ in range(3):
        start = time.perf_counter()
        content = baseline_bytes(train, holdout, CLASSES)
        seconds.append(time.perf_counter() - start)
    mixed = parse_baseline(content)
    table.append(
        ("baseline_bytes, 50,000 x 200 mixed (min of 3)", f"{min(seconds):.2f} s", "<= 1 s", yes(min(seconds) <= 1))
    )
    size_kb = len(content) / 1024
    table.append(("baseline.json, 50,000 x 200 mixed", f"{size_kb:.0f} KB", "<= 300 KB", yes(size_kb <= 300)))
    return mixed


def count_files(table: list, folder: Path, text, mixed) -> None:
    """2. The count file of one process, for each baseline."""
    for name, baseline in (("200 text x 50 values", text), ("200 mixed (1.)", mixed)):
        (own_folder := folder / f"own-{name.split()[1]}").mkdir()
        own = VersionCounts(baseline, SLOT, str(own_folder))
        size = own.path.stat().st_size
        table.append((f"count file per process, {name}, {baseline.cells} cells",
                      f"{size / 1e6:.2f} MB ({size:,} B)", "< 6 MB", yes(size < 6e6)))  # fmt: skip
        del own


def scrapes(table: list, folder: Path, text, mixed) -> None:
    """3. merged + report over 4 workers' files, 5,000 rows each."""
    for name, baseline, frame in (("mixed", mixed, mixed_frame(20_000, seed=5)),
                                  ("text-only", text, text_frame(20_000, seed=6))):  # fmt: skip
        workers = folder / f"workers-{name.replace(' ', '-')}"
        workers.mkdir()
        write_workers(baseline, workers, columns_of(frame), labels(20_000, seed=7))
        total, alone = scrape_times(baseline, workers)
        median = statistics.median(total)
        table.append((f"scrape drift part, {name} 200 features, 4 workers: merged + report, median (max) of 20",
                      f"{median * 1e3:.1f} ms ({max(total) * 1e3:.1f} ms); merged alone {statistics.median(alone) * 1e3:.1f} ms",
                      "< 50 ms (whole /metrics)", yes(max(total) < 0.05)))  # fmt: skip


def counting_costs(table: list, mixed) -> None:
    """4. Per-request counting cost on the mixed 200-feature baseline."""
    live, predicted = columns_of(mixed_frame(1_000, seed=8)), labels(1_000, seed=9)
    memory = VersionCounts(mixed, SLOT, None)
    for rows, number, repeat in ((1, 200, 25), (1_000, 3, 15)):
        columns = {name: values[:rows] for name, values in live.items()}
        chosen = predicted[:rows]
        small = per_call(lambda: small_cells(mixed, columns, chosen), number, repeat)  # noqa: B023
        vector = per_call(lambda: row_cells(mixed, columns, chosen, 1000), number, repeat)  # noqa: B023
        cells = small_cells(mixed, columns, chosen) if rows <= 32 else row_cells(mixed, columns, chosen, 1000)
        add = per_call(lambda: memory.add(*((cells, rows) if rows <= 32 else cells)), number, repeat)  # noqa: B023
        path = "small_cells" if rows <= 32 else "row_cells"
        table.append((f"counting one {rows:,}-row request, 200 mixed features (median)",
                      f"small_cells {small * 1e3:.2f} ms, row_cells {vector * 1e3:.2f} ms, add {add * 1e3:.3f} ms "
                      f"(observe uses {path})", "none given", "-"))  # fmt: skip


def main() -> None:
    load_before = os.getloadavg()
    table = []
    mixed = registration(table)
    # 2. The count file for 200 text features of 50 kept values.
    text_content = baseline_bytes(text_frame(5_000, seed=3), labels(2_000, seed=4), CLASSES)
    text = parse_baseline(text_content)
    assert all(len(cells.values) == 50 for cells in text.features)
    folder = Path(tempfile.mkdtemp(prefix="drift-scale-"))
    try:
        count_files(table, folder, text, mixed)
        scrapes(table, folder, text, mixed)
        counting_costs(table, mixed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cpus = len(os.sched_getaffinity(0))
    print(f"machine: nproc {cpus} (os.cpu_count {os.cpu_count()}), load average before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"Python {sys.version.split()[0]}, numpy {np.__version__}, pandas {pd.__version__}")  # fmt: skip
    print(f"command: {COMMAND}")
    print(
        "Figure 3 is the drift part of a scrape (merged + report), timed in one process: not an HTTP /metrics call.\n"
    )
    print("| figure | measured | budget | |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
