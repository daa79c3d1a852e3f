"""Each row's inputs (only with PREDICTION_LOG_INPUTS) and whether a value was outside the training range.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    with op.batch_alter_table("predictions") as table:  # SQLite alters a table by copying it
        table.add_column(sa.Column("inputs", sa.Text(), nullable=True))
        table.add_column(sa.Column("out_of_range", sa.Boolean(), nullable=True))
