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

from datetime import UTC, datetime
from pathlib import Path

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


def log_time(text: str) -> datetime:
    """An ISO time from a command line as the log keeps times: naive UTC (an offset is converted; none is UTC)."""
    moment = datetime.fromisoformat(text)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


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
