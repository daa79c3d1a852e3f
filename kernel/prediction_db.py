"""The prediction log's database: the `predictions` table, its engine, and its schema kept by alembic.

One code path for both backends, through SQLAlchemy: a SQLite file by default (beside the embedded
MLflow store, so `make run` needs nothing else) and PostgreSQL in production (`PREDICTION_LOG_URL`).
The service creates and migrates the schema itself at start, with alembic as MLflow does, under its own
version table (`prediction_log_version`), so the log may share a database with MLflow's tables.

A row is one answered row: its id, the request's id, the time, the version and route that answered,
the runtime, the predicted label and the probabilities, and whether any value was outside the training range
(null for a version without a drift baseline); `label` and `labelled_at` once ground truth comes back
(POST /feedback). Feature values (`inputs`, a JSON object) only with `PREDICTION_LOG_INPUTS=true`, less the
features `PREDICTION_LOG_EXCLUDE` names.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import sqlalchemy as sa

from kernel.config import Settings, sqlite_path

VERSION_TABLE = "prediction_log_version"
MIGRATIONS = Path(__file__).with_name("prediction_migrations")

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),  # UTC
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("version", sa.String(20), nullable=False),
    sa.Column("route", sa.String(16), nullable=False),
    sa.Column("runtime", sa.String(16), nullable=False),
    sa.Column("prediction", sa.String(256), nullable=False),
    sa.Column("probabilities", sa.Text(), nullable=True),  # JSON: {class: probability}
    sa.Column("label", sa.String(256), nullable=True),  # the ground truth, from POST /feedback
    sa.Column("labelled_at", sa.DateTime(), nullable=True),
    sa.Column("inputs", sa.Text(), nullable=True),  # JSON: {feature: value}, only with PREDICTION_LOG_INPUTS
    sa.Column("out_of_range", sa.Boolean(), nullable=True),  # a value outside the training min/max
    sa.Index("ix_predictions_version_time", "model", "version", "created_at"),
    sa.Index("ix_predictions_labelled", "model", "version", "labelled_at"),
)


_AGO = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def log_time(text: str, now: datetime | None = None) -> datetime:
    """A time from a command line or a request as the log keeps times, naive UTC: an ISO time (an offset is
    converted; none is UTC), or a span back from now, `7d`, `12h`, `30m` or `900s`."""
    ago = _AGO.match(text)
    if ago:
        now = now or datetime.now(UTC).replace(tzinfo=None)
        return now - timedelta(seconds=int(ago.group(1)) * _SECONDS[ago.group(2)])
    moment = datetime.fromisoformat(text)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


# The writer's columns, in this order: what `insert_rows` takes per row (label and labelled_at come with feedback).
WRITTEN = ("id", "request_id", "created_at", "model", "version", "route", "runtime", "prediction", "probabilities",
           "inputs", "out_of_range")  # fmt: skip


class RowInserter:
    """Inserts the writer's rows as plain tuples, many rows per statement (`INSERT ... VALUES (...), (...)`).

    A Core `insert()` with a list of dicts spent 15-20 µs of Python per row building and processing parameters,
    with the GIL held, in a worker that also answers requests; and SQLite stepped once per row, each step letting
    go of the GIL and taking it back from the request threads. Here the parameters go to the driver as they are
    (one flat tuple per statement), and the driver's work, SQLite's B-tree or psycopg2's round trip, runs once per
    statement with the GIL free. The one type a driver does not take as it is, a time on SQLite (stored as
    SQLAlchemy's own text form), goes through the dialect's own bind processor, once per request, not per row."""

    ROWS = 1000  # per statement: 11,000 parameters, under SQLite's limit since 3.32 (32,766) and PostgreSQL's
    NESTED = False  # `probabilities` and `inputs` come as JSON text (True: as the objects themselves)

    def __init__(self, dialect):
        # Positional placeholders: qmark for SQLite; "%s" for psycopg2, whose pyformat takes positional too.
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self.row = f"({', '.join([mark] * len(WRITTEN))})"
        self.rows = self.ROWS
        if dialect.name == "sqlite" and dialect.dbapi.sqlite_version_info < (3, 32):
            self.rows = 999 // len(WRITTEN)  # the older limit of 999 parameters per statement
        self.time = sa.DateTime().dialect_impl(dialect).bind_processor(dialect) or (lambda moment: moment)
        self._statements: dict[int, str] = {}

    def statement(self, rows: int) -> str:
        if rows not in self._statements:
            self._statements[rows] = f"INSERT INTO predictions ({', '.join(WRITTEN)}) VALUES " + ", ".join(
                [self.row] * rows
            )
        return self._statements[rows]

    def insert(self, connection: sa.Connection, rows: list[tuple]) -> None:
        for start in range(0, len(rows), self.rows):
            chunk = rows[start : start + self.rows]
            connection.exec_driver_sql(self.statement(len(chunk)), tuple(itertools.chain.from_iterable(chunk)))

    def insert_request(self, connection: sa.Connection, shared: tuple, ids: list, labels: list,
                       probabilities: list | None, inputs: list | None, flags: list | None) -> None:  # fmt: skip
        """One request's rows, given as what they share (request id, time, model, version, route, runtime) and one
        list per column (None: null in every row). The probabilities and inputs come as objects, whichever inserter
        writes them."""
        if not self.NESTED:
            probabilities, inputs = _json_texts(probabilities), _json_texts(inputs)
        columns = [
            column if column is not None else itertools.repeat(None) for column in (probabilities, inputs, flags)
        ]
        self.insert(connection, [(prediction_id, *shared, *row) for prediction_id, *row in zip(ids, labels, *columns)])


class JsonRowInserter(RowInserter):
    """Inserts the writer's rows as one JSON array per statement, which the database expands itself
    (`INSERT ... SELECT ... FROM json_each(?)` on SQLite 3.38 and later, `json_array_elements` on PostgreSQL).

    With a parameter per value, the driver bound 110,000 of them for a 10,000-row request with the GIL held (33-40
    ms of a worker's time, while its request threads waited). Here the worker encodes the rows once (orjson, about
    1 µs a row) and binds one text; parsing and inserting them is the database's work, with the GIL free: SQLite's
    in the writer thread, PostgreSQL's on its server. The stored values are the same as `RowInserter`'s."""

    # PostgreSQL reads each JSON value as text: the typed columns are cast back.
    CASTS = {"created_at": "timestamp", "out_of_range": "boolean"}
    # The JSON columns come as the objects themselves, nested in the row, and are stored as their JSON text (SQLite
    # and PostgreSQL's `json` both keep orjson's text as it is): no JSON text is made per row in the worker.
    NESTED = True
    OBJECTS = ("probabilities", "inputs")

    def __init__(self, dialect):
        super().__init__(dialect)
        columns = ", ".join(WRITTEN)
        if dialect.name == "sqlite":
            values = ", ".join(f"NULLIF(value -> {index}, 'null')" if name in self.OBJECTS else f"value ->> {index}"
                               for index, name in enumerate(WRITTEN))  # fmt: skip
            self.sql = f"INSERT INTO predictions ({columns}) SELECT {values} FROM json_each(?)"
        else:
            values = ", ".join(
                f"NULLIF((value -> {index})::text, 'null')" if name in self.OBJECTS
                else f"(value ->> {index})" + (f"::{self.CASTS[name]}" if name in self.CASTS else "")
                for index, name in enumerate(WRITTEN)
            )  # fmt: skip
            self.sql = f"INSERT INTO predictions ({columns}) SELECT {values} FROM json_array_elements(%s::json)"
        self.columns_sql = self._columns_sql(dialect.name, columns)

    @staticmethod
    def _columns_sql(dialect: str, columns: str) -> str:
        """`insert_request`'s statement: the six shared values, then the arrays of ids, predictions, probabilities,
        inputs and flags, paired by position (an array may be empty: null in every row)."""
        if dialect == "sqlite":
            arrays = [f"{name} AS MATERIALIZED (SELECT key AS k, value AS v FROM json_each(?{index}))"
                      for index, name in enumerate(("i", "l", "q", "n", "f"), start=7)]  # fmt: skip
            return (f"INSERT INTO predictions ({columns}) WITH {', '.join(arrays)} "
                    "SELECT i.v, ?1, ?2, ?3, ?4, ?5, ?6, l.v, q.v, n.v, f.v FROM i JOIN l ON l.k = i.k "
                    "LEFT JOIN q ON q.k = i.k LEFT JOIN n ON n.k = i.k LEFT JOIN f ON f.k = i.k")  # fmt: skip
        pairs = " ".join(f"LEFT JOIN json_array_elements{kind}(%s::json) WITH ORDINALITY AS {name}(v, k) ON {name}.k = i.k"
                         for name, kind in (("l", "_text"), ("q", ""), ("n", ""), ("f", "_text")))  # fmt: skip
        return (f"INSERT INTO predictions ({columns}) SELECT i.v, %s, %s, %s, %s, %s, %s, l.v, "
                "NULLIF(q.v::text, 'null'), NULLIF(n.v::text, 'null'), f.v::boolean "
                f"FROM json_array_elements_text(%s::json) WITH ORDINALITY AS i(v, k) {pairs}")  # fmt: skip

    @staticmethod
    def usable(dialect) -> bool:
        """SQLite's `->>` came in 3.38 (and a build may leave JSON out: it is tried); PostgreSQL has had
        `json_array_elements` since 9.3."""
        if dialect.name == "sqlite":
            try:
                with contextlib.closing(dialect.dbapi.connect(":memory:")) as probe:
                    return probe.execute("SELECT value ->> 0 FROM json_each('[[7]]')").fetchone() == (7,)
            except dialect.dbapi.Error:
                return False
        return dialect.name == "postgresql" and dialect.paramstyle in ("format", "pyformat")

    def insert(self, connection: sa.Connection, rows: list[tuple]) -> None:
        for start in range(0, len(rows), self.ROWS * 10):
            text = orjson.dumps(rows[start : start + self.ROWS * 10], default=str).decode()
            connection.exec_driver_sql(self.sql, (text,))

    def insert_request(self, connection: sa.Connection, shared: tuple, ids: list, labels: list,
                       probabilities: list | None, inputs: list | None, flags: list | None) -> None:  # fmt: skip
        """A large request's rows as one JSON array per column, which the database pairs up by position.

        Row arrays made the writer build a tuple per row and encode the shared values once per row: 5 ms of a
        worker's GIL for a 10,000-row request, while its request threads waited. Columns are the lists the answer
        already holds, each encoded in one call (about 1 ms in all); the pairing (an automatic index per column on
        SQLite, ordinality on PostgreSQL) is the database's work, with the GIL free."""
        if not ids:
            return
        dumps = orjson.dumps
        arrays = [dumps(column, default=str).decode() if column else "[]"
                  for column in (ids, labels, probabilities, inputs, flags)]  # fmt: skip
        connection.exec_driver_sql(self.columns_sql, (*shared, *arrays))


def _json_texts(objects: list | None) -> list | None:
    return None if objects is None else [orjson.dumps(value, default=str).decode() for value in objects]


def row_inserter(dialect) -> RowInserter:
    """The fastest inserter this database takes."""
    return JsonRowInserter(dialect) if JsonRowInserter.usable(dialect) else RowInserter(dialect)


def database_url(settings: Settings) -> str:
    """`PREDICTION_LOG_URL`, or a SQLite file beside the embedded MLflow store (else in the state folder)."""
    if settings.PREDICTION_LOG_URL:
        return settings.PREDICTION_LOG_URL
    database = sqlite_path(settings.MLFLOW_TRACKING_URI)
    folder = database.parent if database else Path(settings.STATE_DIR)
    return f"sqlite:///{folder / 'predictions.db'}"


def make_engine(url: str) -> sa.Engine:
    """An engine for this process (never shared across a fork): SQLite waits for a writer rather than failing."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 10}, pool_pre_ping=True)

        @sa.event.listens_for(engine, "connect")
        def _wal(connection, _record):  # readers do not block the workers' writers
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")

        return engine
    # psycopg2 batches only INSERTs by default: 10,000 feedback UPDATEs were one round trip each (2.1 s).
    batched = {"executemany_mode": "values_plus_batch"} if sa.make_url(url).get_driver_name() == "psycopg2" else {}
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2, connect_args=_connect_timeout(url),
                            **batched)  # fmt: skip


def _connect_timeout(url: str) -> dict:
    return {"connect_timeout": 5} if url.startswith("postgresql") else {}


def delete_older_than(engine: sa.Engine, cutoff, batch: int = 1000) -> int:
    """Delete the rows predicted before `cutoff` in batches of `batch` (short transactions: writers never wait
    long); returns how many went."""
    deleted = 0
    while True:
        oldest = sa.select(predictions.c.id).where(predictions.c.created_at < cutoff).limit(batch)
        with engine.begin() as connection:
            gone = connection.execute(
                sa.delete(predictions).where(predictions.c.id.in_(oldest.scalar_subquery()))
            ).rowcount
        deleted += gone
        if gone < batch:
            return deleted


def migrate(engine: sa.Engine) -> None:
    """Create or upgrade the schema to the newest revision (alembic, under `VERSION_TABLE`)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
