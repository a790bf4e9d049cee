"""Initial schema: service users, roles, origins, tokens, audit events, change feed.

Revision ID: 0001
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision: later model changes must not rewrite history.
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "service_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.CheckConstraint("kind IN ('service', 'admin')", name=op.f("ck_service_users_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_users")),
        sa.UniqueConstraint("name", name=op.f("uq_service_users_name")),
    )
    op.create_table(
        "role_assignments",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(63), nullable=False),
        sa.Column("assigned_by", sa.String(255), nullable=False),
        sa.Column("assigned_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["service_users.id"],
            name=op.f("fk_role_assignments_user_id_service_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "role", name=op.f("pk_role_assignments")),
    )
    op.create_index(op.f("ix_role_assignments_role"), "role_assignments", ["role"])
    op.create_table(
        "allowed_origins",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["service_users.id"],
            name=op.f("fk_allowed_origins_user_id_service_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "origin", name=op.f("pk_allowed_origins")),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
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
            name=op.f("fk_tokens_user_id_service_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tokens")),
        sa.UniqueConstraint("user_id", "name", name=op.f("uq_tokens_user_id_name")),
    )
    # The proxy's hot path looks tokens up by digest only.
    op.create_index(op.f("ix_tokens_digest"), "tokens", ["digest"], unique=True)
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_index(op.f("ix_audit_events_actor"), "audit_events", ["actor"])
    op.create_table(
        "changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("user_name", sa.String(63), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_changes")),
    )


def downgrade() -> None:
    op.drop_table("changes")
    op.drop_index(op.f("ix_audit_events_actor"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_at"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_tokens_digest"), table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("allowed_origins")
    op.drop_index(op.f("ix_role_assignments_role"), table_name="role_assignments")
    op.drop_table("role_assignments")
    op.drop_table("service_users")
