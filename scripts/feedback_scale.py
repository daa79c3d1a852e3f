"""Issue 17's performance budget for ground truth, measured on SQLite (the default) and PostgreSQL.

Run: PYTHONPATH=. .venv/bin/python scripts/feedback_scale.py [--rows 1000000] [--labelled 100000]

`predictions` (made by `migrate`) gets --rows rows of one model/version over the last 24 h, appended in time order
in requests of 10 rows (ids as serving/prediction_log.py makes them); --labelled of them carry a label (80 % equal
to the prediction) and labelled_at 1 min to 6 h later. SQLite: a temporary file, executemany in one transaction,
no ANALYZE (the service runs none). PostgreSQL (127.0.0.1:5432, user postgres): a fresh database, dropped at the
end, filled by COPY, then ANALYZE with autovacuum off for the table (the state right after a burst of writes);
/performance is timed again after VACUUM ANALYZE (the steady state autovacuum reaches).

1. serving.feedback.performance(window 7 d, min_labels 50): median of 5 in one process, with EXPLAIN of the two
   statements it runs (rebuilt here with the same WHERE). Budget: < 1 s (PostgreSQL). cProfile if over budget.
2. serving.feedback.apply_feedback, 10,000 items for existing ids (fresh, unlabelled ones each run), 3 classes:
   min of 3. Budget: < 2 s on both backends.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import json
import os
import pstats
import secrets
import sqlite3
import statistics
import tempfile
import time
import timeit
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg2
import sqlalchemy as sa

from kernel.prediction_db import make_engine, migrate, predictions
from serving.feedback import apply_feedback, performance

COMMAND = "PYTHONPATH=. .venv/bin/python scripts/feedback_scale.py"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
CLASSES, MODEL, VERSION = ["a", "b", "c"], "iris", "1"
WINDOW, MIN_LABELS, FEEDBACK_ITEMS = 7 * 86400, 50, 10_000
PERF_BUDGET, FEEDBACK_BUDGET = 1.0, 2.0
COLUMNS = ("id", "request_id", "created_at", "model", "version", "route", "runtime", "prediction", "probabilities",
           "label", "labelled_at")  # fmt: skip
PROBABILITIES = [json.dumps({c: (0.8 if c == k else 0.1) for c in CLASSES}) for k in CLASSES]


def stamps(values: np.ndarray) -> list[str]:
    """datetime64[us] as SQLAlchemy's SQLite text ('YYYY-MM-DD HH:MM:SS.ffffff'), which PostgreSQL reads too."""
    return [text.replace("T", " ") for text in np.datetime_as_string(values, unit="us")]


def make_rows(rows: int, labelled: int, seed: int = 17) -> tuple[list[tuple], list[str]]:
    """The rows as tuples in COLUMNS order, and the unlabelled ids in random order (for feedback)."""
    rng = np.random.default_rng(seed)
    now = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "us")
    prefixes = [f"{value:016x}" for value in rng.integers(0, 2**63, rows // 10 + 1)]
    ids = [f"{prefixes[i // 10]}{i % 10:x}" for i in range(rows)]
    ages = np.sort(rng.integers(0, 86_400_000_000, rows // 10 + 1))[::-1].astype("timedelta64[us]")
    created = (now - ages)[np.arange(rows) // 10]  # appended in time order, as the log writer does
    answered = np.minimum(created + rng.integers(60_000_000, 21_600_000_000, rows).astype("timedelta64[us]"), now)
    predicted = rng.integers(0, 3, rows)
    truth = np.where(rng.random(rows) < 0.8, predicted, rng.integers(0, 3, rows))
    chosen = np.zeros(rows, dtype=bool)
    chosen[rng.choice(rows, labelled, replace=False)] = True
    created_text, answered_text = stamps(created), stamps(answered)
    table = [
        (ids[i], prefixes[i // 10], created_text[i], MODEL, VERSION, "stable", "sklearn", CLASSES[predicted[i]],
         PROBABILITIES[predicted[i]], CLASSES[truth[i]] if chosen[i] else None, answered_text[i] if chosen[i] else None)
        for i in range(rows)
    ]  # fmt: skip
    unlabelled = [ids[i] for i in rng.permutation(np.flatnonzero(~chosen))]
    return table, unlabelled


def fill(engine: sa.Engine, rows: list[tuple]) -> None:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            marks = ", ".join("?" * len(COLUMNS))
            cursor.executemany(f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({marks})", rows)
        else:
            for start in range(0, len(rows), 100_000):
                buffer = io.StringIO()
                csv.writer(buffer).writerows(rows[start : start + 100_000])
                buffer.seek(0)
                cursor.copy_expert(f"COPY predictions ({', '.join(COLUMNS)}) FROM STDIN WITH CSV", buffer)
        raw.commit()
    finally:
        raw.close()


def statements(since: datetime) -> list[tuple[str, sa.Select]]:
    """The three statements serving.feedback.performance runs, with the same WHERE."""
    from serving.feedback import LAG_ROWS

    where = sa.and_(predictions.c.model == MODEL, predictions.c.version == VERSION, predictions.c.created_at >= since)
    labelled = sa.and_(where, predictions.c.label.is_not(None))
    count = sa.select(sa.func.count()).select_from(predictions).where(where)
    pairs = (
        sa.select(predictions.c.label, predictions.c.prediction, sa.func.count())
        .where(labelled)
        .group_by(predictions.c.label, predictions.c.prediction)
    )
    lags = sa.select(predictions.c.created_at, predictions.c.labelled_at).where(labelled)
    lags = lags.order_by(predictions.c.labelled_at.desc()).limit(LAG_ROWS)
    return [("count", count), ("confusion pairs", pairs), ("newest labels' lag", lags)]


def explain(engine: sa.Engine, title: str) -> None:
    """Each statement's SQL, its time through SQLAlchemy (execute + fetch all, median of 3) and its plan."""
    since = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=WINDOW)
    prefix = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS)"
    print(f"\n### Query plans: {engine.dialect.name}{title}")
    for name, statement in statements(since):
        sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        with engine.connect() as connection:
            took = timeit.repeat(lambda query=statement: connection.execute(query).all(), number=1, repeat=3)
            plan = connection.exec_driver_sql(f"{prefix} {sql}").all()
        print(f"\n{name}: {statistics.median(took):.3f} s via SQLAlchemy (median of 3)\n```\n{' '.join(sql.split())}")
        print("\n".join(f"  {row[-1]}" for row in plan) + "\n```")


def time_performance(engine: sa.Engine, rows: int, labelled: int) -> float:
    times, answer = [], {}  # one process, warm: the engine's pool and the page cache
    for _ in range(5):
        start = time.perf_counter()
        answer = performance(engine, MODEL, VERSION, seconds=WINDOW, classes=CLASSES, min_labels=MIN_LABELS)
        times.append(time.perf_counter() - start)
    assert (answer["status"], answer["predicted_rows"], answer["labelled_rows"]) == ("ok", rows, labelled), answer
    print(f"performance: {', '.join(f'{t:.3f}' for t in times)} s; accuracy {answer['accuracy']:.3f}")
    return statistics.median(times)


def profile(function, *args, **kwargs) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(function, *args, **kwargs)
    print(f"\ncProfile of one {function.__name__}() call (by own time):\n```")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
    print("```")


def run(backend: str, url: str, rows: list[tuple], unlabelled: list[str], labelled: int, results: list) -> None:
    engine = make_engine(url)
    try:
        migrate(engine)
        start = time.perf_counter()
        fill(engine, rows)
        if backend == "PostgreSQL":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.exec_driver_sql("ALTER TABLE predictions SET (autovacuum_enabled = false)")
                connection.exec_driver_sql("ANALYZE predictions")
        print(f"\n## {backend}\nfilled {len(rows):,} rows in {time.perf_counter() - start:.1f} s")
        figure = time_performance(engine, len(rows), labelled)
        results.append(("/performance (median of 5)", backend, figure, PERF_BUDGET))
        explain(engine, " (after ANALYZE)" if backend == "PostgreSQL" else " (no ANALYZE)")
        if figure >= PERF_BUDGET:
            profile(performance, engine, MODEL, VERSION, seconds=WINDOW, classes=CLASSES, min_labels=MIN_LABELS)
        if backend == "PostgreSQL":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.exec_driver_sql("VACUUM ANALYZE predictions")
            figure = time_performance(engine, len(rows), labelled)
            results.append(("/performance after VACUUM", backend, figure, PERF_BUDGET))
            explain(engine, " (after VACUUM ANALYZE)")
        times = []
        for at in range(0, 3 * FEEDBACK_ITEMS, FEEDBACK_ITEMS):
            chosen = unlabelled[at : at + FEEDBACK_ITEMS]
            items = [{"prediction_id": pid, "label": CLASSES[k % 3]} for k, pid in enumerate(chosen)]
            start = time.perf_counter()
            answer = apply_feedback(engine, items, lambda name, version: CLASSES)
            times.append(time.perf_counter() - start)
            assert answer["accepted"] + answer["updated"] == len(items) and not answer["unknown_ids"], answer
        print(f"apply_feedback, {len(items):,} items: {', '.join(f'{t:.3f}' for t in times)} s")
        results.append((f"feedback {len(items):,} labels (min of 3)", backend, min(times), FEEDBACK_BUDGET))
        if min(times) >= FEEDBACK_BUDGET:  # the last run's ids again: "updated" rather than "accepted"
            profile(apply_feedback, engine, items, lambda name, version: CLASSES)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--labelled", type=int, default=100_000)
    args = parser.parse_args()
    assert args.rows - args.labelled >= 3 * FEEDBACK_ITEMS, "feedback needs 30,000 unlabelled rows"
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows, unlabelled = make_rows(args.rows, args.labelled)
    print(f"# {args.rows:,} rows, {args.labelled:,} labelled, built in Python in {time.perf_counter() - start:.1f} s")
    results: list[tuple] = []
    with tempfile.TemporaryDirectory() as folder:
        run("SQLite", f"sqlite:///{folder}/predictions.db", rows, unlabelled, args.labelled, results)
    pg_version, name = "not reachable", f"feedback_scale_{secrets.token_hex(4)}"
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as error:
        print(f"\nPostgreSQL skipped: not reachable at {PG['host']}:{PG['port']} ({str(error).strip()})")
    else:
        admin.autocommit = True
        pg_version = f"{admin.server_version // 10000}.{admin.server_version % 100}"
        try:
            with admin.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
            url = f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
            run("PostgreSQL", url, rows, unlabelled, args.labelled, results)
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.close()
            print(f"dropped database {name}")
    print("\n| measure | backend | figure | budget | met |\n|---|---|---|---|---|")
    for measure, backend, figure, budget in results:
        print(f"| {measure} | {backend} | {figure:.3f} s | < {budget:g} s | {'yes' if figure < budget else 'NO'} |")
    load = "/".join(f"{value:.2f}" for value in load_before)
    print(f"\nMachine: nproc {os.cpu_count()}, load average before {load}, after "
          f"{'/'.join(f'{value:.2f}' for value in os.getloadavg())}; SQLite {sqlite3.sqlite_version}, "
          f"PostgreSQL {pg_version}; SQLAlchemy {sa.__version__}\nCommand: {COMMAND}")  # fmt: skip


if __name__ == "__main__":
    main()
