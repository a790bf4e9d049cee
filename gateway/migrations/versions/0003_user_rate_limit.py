"""A service user's own rate limit (README "Rate limits").

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: existing users keep following `rate_limits.per_user`.
    op.add_column("service_users", sa.Column("rate_limit", sa.String(64), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35 has it), not batch_alter_table: batch mode would
    # recreate service_users, and with foreign_keys=ON dropping the old table cascades to
    # every role assignment, origin, token and API key of every user.
    op.drop_column("service_users", "rate_limit")
