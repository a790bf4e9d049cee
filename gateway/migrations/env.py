"""Alembic environment of the gateway's store.

Runs only against a connection handed in by ``gateway.store.migrate`` through
``config.attributes["connection"]`` (the run_sync pattern for async engines): the caller
owns the engine, the transaction and the cross-process lock, so this file never opens
a database itself and there is no alembic.ini or URL to keep in sync.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from gateway.models import Base


def run_migrations(connection: Connection) -> None:
    """Bring the schema behind `connection` to the requested revision."""
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things in place; later revisions may need batch mode.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run `gateway serve` or the CLI")

_connection = context.config.attributes.get("connection")
if not isinstance(_connection, Connection):
    raise RuntimeError(
        "the gateway's migrations run through gateway.store.migrate(), which passes a connection"
    )
run_migrations(_connection)
