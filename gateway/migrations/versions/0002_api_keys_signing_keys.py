"""API keys and signing keys (README "API keys and short-lived tokens").

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("expires_at", _TIME, nullable=True),
        sa.Column("roles", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("last_used_at", _TIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["service_users.id"],
            name=op.f("fk_api_keys_user_id_service_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    # The token endpoint looks keys up by the digest of the presented secret.
    op.create_index(op.f("ix_api_keys_digest"), "api_keys", ["digest"], unique=True)
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"])
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(32), nullable=False),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_pem", sa.Text(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("signs_from", _TIME, nullable=False),
        sa.Column("retired_at", _TIME, nullable=True),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
    )


def downgrade() -> None:
    op.drop_table("signing_keys")
    op.drop_index(op.f("ix_api_keys_user_id"), table_name="api_keys")
    op.drop_index(op.f("ix_api_keys_digest"), table_name="api_keys")
    op.drop_table("api_keys")
