"""alembic's environment for the prediction log: always online, on the connection `migrate` passes."""

from alembic import context

from kernel.prediction_db import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
