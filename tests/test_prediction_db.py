"""The prediction log's table (kernel/prediction_db.py): what its two inserters store."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_both_inserters_store_the_same_rows(backend, tmp_path):
    """The writer's JSON inserter (one parameter per statement, expanded by the database) stores exactly what the
    plain one (a parameter per value) does: quotes, backslashes, non-ASCII, nulls, flags and times."""
    from kernel.prediction_db import WRITTEN, JsonRowInserter, RowInserter, metadata, predictions
    from tests.servers import create_database, drop_database, require_postgres

    database = None
    if backend == "postgresql":
        require_postgres()
        database = create_database()
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
    else:
        url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
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
            with engine.connect() as connection:
                read = connection.execute(
                    sa.select(*(predictions.c[name] for name in WRITTEN)).where(predictions.c.id.like(f"{prefix}-%"))
                    .order_by(predictions.c.id)
                ).all()  # fmt: skip
            stored.append([row[1:] for row in read])
        assert len(stored[0]) == 2_345 and stored[0] == stored[1]
        assert stored[1][1][1] == datetime(2026, 12, 7, 19, 50, 2, 123456) and stored[1][1][9] is True
    finally:
        engine.dispose()
        if database:
            drop_database(database)
