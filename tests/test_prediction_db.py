"""The prediction log's table (kernel/prediction_db.py): what its two inserters store."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
import pytest
import sqlalchemy as sa


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine on an empty log table: a SQLite file, and a new PostgreSQL database (where it is available)."""
    from kernel.prediction_db import metadata
    from tests.servers import create_database, drop_database, require_postgres

    database = None
    if request.param == "postgresql":
        require_postgres()
        database = create_database()
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    else:
        url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        if database:
            drop_database(database)


def written(engine, prefix: str) -> list:
    """The stored rows whose id starts with `prefix-`, in the writer's columns, by id."""
    from kernel.prediction_db import WRITTEN, predictions

    with engine.connect() as connection:
        return connection.execute(
            sa.select(*(predictions.c[name] for name in WRITTEN)).where(predictions.c.id.like(f"{prefix}-%"))
            .order_by(predictions.c.id)
        ).all()  # fmt: skip


def test_both_inserters_store_the_same_rows(engine):
    """The writer's JSON inserter (one parameter per statement, expanded by the database) stores exactly what the
    plain one (a parameter per value) does: quotes, backslashes, non-ASCII, nulls, flags and times."""
    from kernel.prediction_db import JsonRowInserter, RowInserter

    assert JsonRowInserter.usable(engine.dialect)
    moment = datetime(2026, 12, 7, 19, 50, 1, 123456)
    stored = []
    for prefix, inserter in (("plain", RowInserter(engine.dialect)), ("json", JsonRowInserter(engine.dialect))):
        # The writer hands the plain inserter JSON text, made by orjson, and the JSON one the objects themselves.
        encode = (lambda value: value) if inserter.NESTED else (lambda value: orjson.dumps(value).decode())
        rows = [(f"{prefix}-{i:05d}", 'req "é" \\', inserter.time(moment + timedelta(seconds=i % 7)), "iris",
                 "12", "candidate", "onnx", ['setosa', 'a "quoted" \\ label', "ü"][i % 3],
                 encode({"setosa": 0.1234567, "b": 1e-07, "ü \"x\"": 1.0}) if i % 2 else None,
                 None if i % 4 else encode({"x": 1.5, "t": 'a"b', "n": None}), [None, True, False][i % 3])
                for i in range(2_345)]  # fmt: skip
        with engine.begin() as connection:
            inserter.insert(connection, rows)
        stored.append([row[1:] for row in written(engine, prefix)])
    assert len(stored[0]) == 2_345 and stored[0] == stored[1]
    assert stored[1][1][1] == datetime(2026, 12, 7, 19, 50, 2, 123456) and stored[1][1][9] is True


def test_a_large_request_inserted_as_columns_stores_what_rows_do(engine):
    """A large request's rows, given as one list per column (`insert_request`), are stored exactly as the same rows
    given one by one: each id with its own label, probabilities, inputs and flag, and the shared values in each."""
    from kernel.prediction_db import JsonRowInserter, RowInserter

    plain, json_rows = RowInserter(engine.dialect), JsonRowInserter(engine.dialect)
    moment, count = datetime(2026, 12, 8, 2, 15, 0, 654321), 3_001
    labels = [["setosa", 'a "quoted" \\ label', "ü"][i % 3] for i in range(count)]
    probabilities = [{"setosa": round(i / count, 6), 'ü "x"': 1e-07} for i in range(count)]
    inputs = [{"x": i * 0.5, "t": 'a"b', "n": None} for i in range(count)]
    flags = [[True, False][i % 2] for i in range(count)]
    shared = ('req "é" \\', None, "iris", "12", "candidate", "onnx")
    stored = []
    for prefix, inserter, kind in (("rows", plain, "rows"), ("plain", plain, "columns"),
                                   ("json", json_rows, "columns"), ("nulls", json_rows, "columns")):  # fmt: skip
        ids = [f"{prefix}-{i:05d}" for i in range(count)]
        values = (*shared[:1], inserter.time(moment), *shared[2:])
        with engine.begin() as connection:
            if kind == "rows":
                rows = [(ids[i], *values, labels[i], orjson.dumps(probabilities[i]).decode(),
                         orjson.dumps(inputs[i]).decode(), flags[i]) for i in range(count)]  # fmt: skip
                inserter.insert(connection, rows)
            elif prefix == "nulls":  # no probabilities, inputs or flags: null in every row
                inserter.insert_request(connection, values, ids, labels, None, None, None)
            else:
                inserter.insert_request(connection, values, ids, labels, probabilities, inputs, flags)
        stored.append([(row[0].split("-", 1)[1], *row[1:]) for row in written(engine, prefix)])
    assert len(stored[0]) == count and stored[0] == stored[1] == stored[2]
    assert stored[2][5][1:] == ('req "é" \\', moment, "iris", "12", "candidate", "onnx", "ü",
                                orjson.dumps(probabilities[5]).decode(), orjson.dumps(inputs[5]).decode(), False)  # fmt: skip
    assert [row[7] for row in stored[3]] == labels and {row[8:] for row in stored[3]} == {(None, None, None)}
