"""Retention's horizon for the change feed, and change notifications on PostgreSQL.

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-02 00:00:00

`feed_horizon` holds one row: the newest change id retention has removed. On PostgreSQL a
statement trigger on `changes` sends NOTIFY gateway_changes when the writing transaction
commits (every writer: any instance, the CLI, an older gateway), so instances listening
poll at once instead of at their next 250 ms tick (README "Freshness").
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION gateway_changes_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('gateway_changes', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
_TRIGGER = """
CREATE TRIGGER gateway_changes_notify AFTER INSERT ON changes
FOR EACH STATEMENT EXECUTE FUNCTION gateway_changes_notify()
"""


def upgrade() -> None:
    horizon = op.create_table(
        "feed_horizon",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("below", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feed_horizon")),
    )
    op.bulk_insert(horizon, [{"id": 1, "below": 0}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_FUNCTION)
        op.execute(_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS gateway_changes_notify ON changes")
        op.execute("DROP FUNCTION IF EXISTS gateway_changes_notify()")
    op.drop_table("feed_horizon")
