"""The predictions table and its indexes.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("version", sa.String(20), nullable=False),
        sa.Column("route", sa.String(16), nullable=False),
        sa.Column("runtime", sa.String(16), nullable=False),
        sa.Column("prediction", sa.String(256), nullable=False),
        sa.Column("probabilities", sa.Text(), nullable=True),
        sa.Column("label", sa.String(256), nullable=True),
        sa.Column("labelled_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_predictions_version_time", "predictions", ["model", "version", "created_at"])
    op.create_index("ix_predictions_labelled", "predictions", ["model", "version", "labelled_at"])
