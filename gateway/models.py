"""The store's schema as SQLAlchemy 2 ORM classes (typed ``Mapped[...]``).

Imports: sqlalchemy only. No engine or session lives here; ``store.py`` owns those and
the Alembic revisions in ``gateway/migrations/versions`` create exactly these tables
(a test compares the two).

Tables:
- ``service_users``: identities (kind ``service`` or ``admin``), each with an optional own rate limit.
- ``role_assignments`` / ``allowed_origins``: per-user sets, deleted with the user.
- ``tokens``: credentials; only the SHA-256 ``digest`` of a secret is ever stored.
- ``api_keys``: key id + secret pairs exchanged for short-lived JWTs (digest only, as tokens).
- ``signing_keys``: the gateway's JWT signing keys; the private half only sealed (AEAD).
- ``audit_events``: who changed what (never a secret).
- ``changes``: the change feed other processes poll to invalidate their identity cache.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AllowedOrigin",
    "ApiKey",
    "AuditEvent",
    "Base",
    "Change",
    "RoleAssignment",
    "ServiceUser",
    "SigningKey",
    "Token",
    "UTCDateTime",
]

NAME_LENGTH = 63
DIGEST_LENGTH = 64  # hex SHA-256
RATE_LIMIT_LENGTH = 64  # "1000000000/86400s:1000000000" is 28

# Deterministic constraint names, so later migrations can refer to them on both dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every dialect.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so values are stored as
    naive UTC text and made aware again on the way out. Naive input is refused: a
    silent local-time interpretation would shift expiry times.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata and naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ServiceUser(Base):
    """A service user or an admin identity. Holds tokens; cannot log in."""

    __tablename__ = "service_users"
    __table_args__ = (CheckConstraint("kind IN ('service', 'admin')", name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    # The user's own rate limit as `ratelimit.format_spec` text ("100/1s:200"); NULL follows
    # `rate_limits.per_user`. Text, not three columns: it is read whole on every cold lookup.
    rate_limit: Mapped[str | None] = mapped_column(String(RATE_LIMIT_LENGTH))


class RoleAssignment(Base):
    """One role held by one user (names refer to policies/, which may drop them later)."""

    __tablename__ = "role_assignments"
    __table_args__ = (Index(None, "role"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("service_users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    assigned_by: Mapped[str] = mapped_column(String(255))
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AllowedOrigin(Base):
    """One browser origin (normalised ``scheme://host[:port]``) a user's tokens may come from."""

    __tablename__ = "allowed_origins"

    user_id: Mapped[int] = mapped_column(ForeignKey("service_users.id", ondelete="CASCADE"), primary_key=True)
    origin: Mapped[str] = mapped_column(String(255), primary_key=True)


class Token(Base):
    """A credential of one user. The secret itself is never stored, only its digest.

    ``roles`` is SQL NULL when the token follows the user's roles, else a fixed JSON list
    (``none_as_null`` so that Python ``None`` is NULL, not the JSON literal ``null``).
    """

    __tablename__ = "tokens"
    __table_args__ = (
        UniqueConstraint("user_id", "name"),
        Index(None, "digest", unique=True),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("service_users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    description: Mapped[str | None] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    roles: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        # The default repr would be fine, but spell it out so the digest never shows up
        # in a debugger dump or log line next to a token id.
        return f"Token(id={self.id!r}, name={self.name!r}, user_id={self.user_id!r})"


class ApiKey(Base):
    """An API key of one user: a public id and a secret (only its digest stored), exchanged at
    the token endpoint for short-lived JWTs. ``roles`` as for tokens (NULL: the user's)."""

    __tablename__ = "api_keys"
    __table_args__ = (Index(None, "digest", unique=True), Index(None, "user_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("service_users.id", ondelete="CASCADE"))
    description: Mapped[str | None] = mapped_column(Text)
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    roles: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, user_id={self.user_id!r})"


class SigningKey(Base):
    """One JWT signing key. ``sealed`` is the private half encrypted with a secret that is
    never in the store; ``signs_from`` is when it starts signing (it is published before)."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(32), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_pem: Mapped[str] = mapped_column(Text)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    signs_from: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a newer key took over
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # compromised: never trusted

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, alg={self.alg!r})"


class AuditEvent(Base):
    """One change made by an admin or the CLI (`detail` never holds a secret)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "at"), Index(None, "actor"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class Change(Base):
    """One entry of the change feed: "identities of this user (or this token) changed".

    Written in the same transaction as the mutation, so a poller that sees the row also
    sees the change. ``token_id`` NULL means every token of the user.
    """

    __tablename__ = "changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    user_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    token_id: Mapped[str | None] = mapped_column(String(32))


class FeedHorizon(Base):
    """The one row saying which change-feed entries retention removed: every id ≤ `below`.

    A gateway whose cursor is below it has missed changes it can no longer read, so it
    drops every cached identity instead (README "Retention").
    """

    __tablename__ = "feed_horizon"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    below: Mapped[int] = mapped_column(Integer, default=0)
