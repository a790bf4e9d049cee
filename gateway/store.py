"""The store: engine and sessions, schema migrations, and the proxy's read path.

Imports: models, errors, sqlalchemy, alembic. No module-level engine: ``open_store``
builds one ``Store`` per process (``app.py`` or the CLI owns it and closes it).

What lives here:
- ``open_store(url)`` / ``migrate(engine)``: SQLite (WAL, busy timeout, foreign keys,
  ``BEGIN IMMEDIATE`` for writes) or PostgreSQL (short connect timeout, pre-ping,
  an advisory lock so concurrent starts migrate once).
- ``Store``: the hot-path lookup by token digest, the change feed, ``last_used_at``
  batches, and the origin index for CORS. Mutations live in ``services.py``.

Contract: every database failure leaves this module as ``StoreUnavailable`` (public
message only; the cause is chained and logged), never as raw driver text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import JSON, Select, bindparam, event, func, literal, or_, select, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from gateway.errors import ConfigError, Conflict, StoreUnavailable
from gateway.models import AllowedOrigin, ApiKey, FeedHorizon, RoleAssignment, ServiceUser, Token
from gateway.models import Change as ChangeRow
from gateway.ratelimit import Limit, parse_spec

__all__ = ["Change", "Principal", "Store", "migrate", "open_store", "stored_limit", "translate_errors"]

log = logging.getLogger("gateway.store")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary constants ("gw" + purpose) naming the PostgreSQL advisory locks we take.
MIGRATION_LOCK = 0x6777_0001
CHANGES_LOCK = 0x6777_0002
RETENTION_LOCK = 0x6777_0003
# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
_IMMEDIATE = "gateway_sqlite_immediate"
UNREACHABLE = "the store cannot be reached"


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity behind one token, as the identity cache holds it (no secret in it)."""

    user: str
    kind: str
    disabled: bool
    token_id: str
    token_name: str
    expires_at: datetime | None
    user_roles: tuple[str, ...]
    """The roles the user holds, sorted (as assigned; includes not expanded)."""
    token_roles: tuple[str, ...] | None
    """The token's own roles list, sorted; None = it carries the user's roles.

    What a token carries depends on the policies (includes), so it is computed per request
    with `RouteTable.carried`, never stored or cached here."""
    origins: frozenset[str]
    """The user's allowed origins (normalised)."""
    rate_limit: Limit | None = None
    """The user's own rate limit (README "Rate limits"); None = `rate_limits.per_user`."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change-feed entry: the identities of `user` (or only `token_id`) changed."""

    id: int
    user: str
    token_id: str | None


@asynccontextmanager
async def translate_errors(conflict: str | None = None) -> AsyncIterator[None]:
    """Turn database exceptions into the gateway's error tree.

    `conflict` is the public message for a unique-constraint violation (a race the
    caller's own checks could not see); without it such a violation is a plain outage.
    """
    try:
        yield
    except IntegrityError as exc:
        if conflict is None:
            log.error("unexpected integrity error: %s", exc)
            raise StoreUnavailable(UNREACHABLE) from exc
        raise Conflict(conflict) from exc
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # Engines are built with hide_parameters=True, so this text holds no digest.
        log.debug("store error: %s", exc, exc_info=True)
        raise StoreUnavailable(UNREACHABLE) from exc


class Store:
    """One engine plus sessionmakers; the read path of the proxy and the change feed.

    Contract: call ``close()`` once when done. Methods may be called concurrently from
    many tasks (each opens its own session).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self.url: str = engine.url.render_as_string(hide_password=True)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(engine, expire_on_commit=False)
        # A lookup is one SELECT: on PostgreSQL it needs no BEGIN/ROLLBACK round trips around it.
        # (SQLite keeps its local BEGIN: switching pysqlite's isolation level back and forth
        # would undo the explicit-BEGIN recipe of _sqlite_setup.)
        self._reader = engine
        if self.dialect == "postgresql":
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._lookup = _lookup_statement(self.dialect)
        self._key_by_digest = _key_statement(self.dialect, ApiKey.digest)
        self._key_by_id = _key_statement(self.dialect, ApiKey.id)
        # Same pool; on SQLite its transactions take the write lock up front (_sqlite_setup).
        self.write_sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            engine.execution_options(**{_IMMEDIATE: True}), expire_on_commit=False
        )

    def __repr__(self) -> str:
        return f"Store(url={self.url!r})"

    async def lookup_token(self, digest: str) -> Principal | None:
        """The Principal of the token whose secret hashes to `digest`, or None.

        One statement, one round trip: token ⋈ user by the unique digest index, with the
        user's roles and origins aggregated by correlated subqueries on their primary keys.
        """
        async with translate_errors(), self._reader.connect() as connection:
            found = (await connection.execute(self._lookup, {"digest": digest})).one_or_none()
        return None if found is None else _principal(*found)

    async def lookup_key(self, digest: str) -> Principal | None:
        """The Principal of the API key whose secret hashes to `digest` (`token_id` is the key id)."""
        async with translate_errors(), self._reader.connect() as connection:
            found = (await connection.execute(self._key_by_digest, {"value": digest})).one_or_none()
        return None if found is None else _principal(*found)

    async def key_principal(self, key_id: str) -> Principal | None:
        """The Principal of API key `key_id` as the store has it now (the JWT path's revocation state)."""
        async with translate_errors(), self._reader.connect() as connection:
            found = (await connection.execute(self._key_by_id, {"value": key_id})).one_or_none()
        return None if found is None else _principal(*found)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers a trivial query."""
        async with translate_errors(), self.engine.connect() as connection:
            await connection.execute(select(literal(1)))

    async def record_last_used(self, seen: Mapping[str, datetime], *, keys: bool = False) -> None:
        """Write `last_used_at` for many tokens (API keys with `keys`) in one batch; never moves
        a time backwards.

        Not a change: the feed is for authentication state, and this runs constantly.
        """
        if not seen:
            return
        model: type[Token] | type[ApiKey] = ApiKey if keys else Token
        statement = (
            update(model)
            .where(model.id == bindparam("b_id"))
            .where(or_(model.last_used_at.is_(None), model.last_used_at < bindparam("b_at")))
            .values(last_used_at=bindparam("b_at"))
        )
        params = [{"b_id": token_id, "b_at": at} for token_id, at in sorted(seen.items())]
        async with translate_errors(), self.write_sessions.begin() as session:
            connection = await session.connection()
            await connection.execute(statement, params)

    async def latest_change(self) -> int:
        """The id of the newest change-feed entry (or the newest retention removed), 0 when none."""
        async with translate_errors(), self.sessions() as session:
            latest = await session.scalar(select(func.max(ChangeRow.id)))
            horizon = await session.scalar(select(FeedHorizon.below).where(FeedHorizon.id == 1))
        return max(int(latest or 0), int(horizon or 0))

    async def changes_since(self, cursor: int, limit: int = 1000) -> list[Change]:
        """Change-feed entries with id > `cursor`, oldest first, at most `limit`.

        Ids become visible in increasing order (writers serialise on CHANGES_LOCK or on
        SQLite's single writer), so a cursor never skips a late-committing entry.
        """
        async with translate_errors(), self.sessions() as session:
            rows = (
                await session.execute(
                    select(ChangeRow.id, ChangeRow.user_name, ChangeRow.token_id)
                    .where(ChangeRow.id > cursor)
                    .order_by(ChangeRow.id)
                    .limit(limit)
                )
            ).all()
        return [Change(id=row_id, user=user, token_id=token_id) for row_id, user, token_id in rows]

    async def feed_since(self, cursor: int, limit: int = 1000) -> tuple[int, list[Change]]:
        """Retention's horizon (every id up to it was removed) and `changes_since(cursor)`, in
        one round trip: a poll must learn in the same read whether it can still trust its cursor.

        Retention keeps the newest change, so a cursor below the horizon always gets at least
        one row here, and with it the horizon (0 when nothing follows the cursor)."""
        horizon = select(FeedHorizon.below).where(FeedHorizon.id == 1).scalar_subquery()
        async with translate_errors(), self.sessions() as session:
            rows = (
                await session.execute(
                    select(ChangeRow.id, ChangeRow.user_name, ChangeRow.token_id, func.coalesce(horizon, 0))
                    .where(ChangeRow.id > cursor)
                    .order_by(ChangeRow.id)
                    .limit(limit)
                )
            ).all()
        changes = [Change(id=row_id, user=user, token_id=token_id) for row_id, user, token_id, _ in rows]
        return (int(rows[0][3]) if rows else 0), changes

    async def active_origins(self) -> dict[str, frozenset[str]]:
        """Origin → names of the enabled service users that allow it (the CORS index)."""
        async with translate_errors(), self.sessions() as session:
            rows = (
                await session.execute(
                    select(AllowedOrigin.origin, ServiceUser.name)
                    .join(ServiceUser, ServiceUser.id == AllowedOrigin.user_id)
                    .where(ServiceUser.disabled.is_(False), ServiceUser.kind == "service")
                )
            ).all()
        index: dict[str, set[str]] = {}
        for origin, user in rows:
            index.setdefault(origin, set()).add(user)
        return {origin: frozenset(users) for origin, users in index.items()}

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def stored_limit(text: str | None, user: str) -> Limit | None:
    """The Limit of a user's `rate_limit` column; None when it is NULL or does not parse.

    The services only write `format_spec` text, so a value that fails to parse was written by
    hand or by another version: the user then follows `rate_limits.per_user` rather than
    every request of theirs failing. The column holds no secret; the value is logged quoted
    (%r) and cut short, as it is free text from the database.
    """
    if text is None:
        return None
    try:
        return parse_spec(text)
    except ValueError:
        log.warning(
            "user %r has a rate_limit the gateway cannot read (%r); the default applies", user, text[:64]
        )
        return None


def _principal(
    credential_id: str,
    name: str,
    expires_at: datetime | None,
    fixed: list[str] | None,
    user: str,
    kind: str,
    disabled: bool,
    rate_limit: str | None,
    roles: list[str] | None,
    origins: list[str] | None,
) -> Principal:
    return Principal(
        user=user,
        kind=kind,
        disabled=disabled,
        token_id=credential_id,
        token_name=name,
        expires_at=expires_at,
        user_roles=tuple(sorted(set(roles or ()))),
        token_roles=None if fixed is None else tuple(sorted(set(fixed))),
        origins=frozenset(origins or ()),
        rate_limit=stored_limit(rate_limit, user),
    )


def _user_aggregates(dialect: str) -> tuple[Any, Any]:
    """The user's roles and origins as JSON arrays (correlated subqueries on their primary keys)."""
    aggregate = func.json_group_array if dialect == "sqlite" else func.json_agg
    roles = (
        select(aggregate(RoleAssignment.role, type_=JSON))
        .where(RoleAssignment.user_id == ServiceUser.id)
        .scalar_subquery()
    )
    origins = (
        select(aggregate(AllowedOrigin.origin, type_=JSON))
        .where(AllowedOrigin.user_id == ServiceUser.id)
        .scalar_subquery()
    )
    return roles, origins


def _key_statement(dialect: str, column: Any) -> Select[Any]:
    """api key ⋈ user by `column` (digest or id), in the token lookup's shape."""
    roles, origins = _user_aggregates(dialect)
    return (
        select(
            ApiKey.id,
            ApiKey.id.label("name"),  # a key has no name: its id names it in messages
            ApiKey.expires_at,
            ApiKey.roles,
            ServiceUser.name,
            ServiceUser.kind,
            ServiceUser.disabled,
            ServiceUser.rate_limit,
            roles,
            origins,
        )
        .join(ServiceUser, ServiceUser.id == ApiKey.user_id)
        .where(column == bindparam("value"))
    )


def _lookup_statement(dialect: str) -> Select[Any]:
    """token ⋈ user by digest, with the user's rate limit, roles and origins (JSON arrays)."""
    roles, origins = _user_aggregates(dialect)
    return (
        select(
            Token.id,
            Token.name,
            Token.expires_at,
            Token.roles,
            ServiceUser.name,
            ServiceUser.kind,
            ServiceUser.disabled,
            ServiceUser.rate_limit,
            roles,
            origins,
        )
        .join(ServiceUser, ServiceUser.id == Token.user_id)
        .where(Token.digest == bindparam("digest"))
    )


def _sqlite_setup(engine: AsyncEngine) -> None:
    """Per-connection SQLite settings, and explicit BEGIN handling.

    pysqlite's own transaction handling only begins before DML (so DDL and reads run
    outside any transaction) and can never BEGIN IMMEDIATE. We switch it off and emit
    BEGIN ourselves (the SQLAlchemy-documented recipe). Writers use BEGIN IMMEDIATE: a
    deferred transaction that reads and then writes fails at once with "database is
    locked" (no busy wait) when another process wrote in between.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: str) -> AsyncEngine:
    """An AsyncEngine for a sqlite+aiosqlite or postgresql+asyncpg URL, configured for the gateway."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError([f"store.url: not a database URL ({exc.__class__.__name__})"]) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        options: dict[str, Any] = {}
        if parsed.database in (None, "", ":memory:"):
            # One shared connection, or every pooled connection would see its own empty DB.
            options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        engine = create_async_engine(parsed, hide_parameters=True, **options)
        _sqlite_setup(engine)
        return engine
    if backend == "postgresql":
        return create_async_engine(
            parsed,
            hide_parameters=True,
            pool_pre_ping=True,
            # asyncpg waits 60 s to connect by default, and a query on a half-open TCP
            # connection waits forever: an outage must become a 503, not a hang.
            connect_args={"timeout": 3, "command_timeout": 10},
        )
    raise ConfigError(
        [f"store.url: unsupported database {backend!r} (use sqlite+aiosqlite or postgresql+asyncpg)"]
    )


def _alembic_config(connection: Connection) -> AlembicConfig:
    config = AlembicConfig()
    # ConfigParser interpolation: a '%' in the install path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    from alembic.script import ScriptDirectory

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return ScriptDirectory.from_config(config).get_current_head()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to head, once even when several processes start together.

    On SQLite a writer may wait longer than the busy timeout when many processes start
    on a fresh file at once (or the machine is loaded): retry a few times before giving up.
    """
    attempts = 6 if engine.dialect.name == "sqlite" else 1
    for attempt in range(attempts):
        try:
            await _migrate_once(engine)
            return
        except StoreUnavailable:
            if attempt == attempts - 1:
                raise
            log.warning("store busy while migrating; trying again")
            await asyncio.sleep(0.5)


async def _migrate_once(engine: AsyncEngine) -> None:
    """One attempt at bringing the schema to head.

    The whole upgrade is one transaction. PostgreSQL: under a transaction-scoped
    advisory lock, so the others wait, then find the schema at head. SQLite: under
    BEGIN IMMEDIATE (the database write lock) plus the busy timeout.
    """
    async with translate_errors(), engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection = await connection.execution_options(**{_IMMEDIATE: True})
        async with connection.begin():
            if engine.dialect.name == "postgresql":
                # Poll rather than block: a blocking wait would be one statement, cut
                # off by asyncpg's command_timeout if another process migrates longer.
                try_lock = select(func.pg_try_advisory_xact_lock(MIGRATION_LOCK))
                while not (await connection.execute(try_lock)).scalar():
                    await asyncio.sleep(0.1)
            try:
                await connection.run_sync(_upgrade)
            except CommandError as exc:
                # Typically a revision from a newer gateway (a rollback of the software).
                log.error("cannot migrate the store: %s", exc)
                raise StoreUnavailable(
                    "the store's schema is not one this gateway knows (written by a newer version?)"
                ) from exc


_migrate = migrate  # open_store's keyword argument shadows the name


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Open the store at `url` (and migrate it unless told not to); raises StoreUnavailable."""
    engine = create_engine(url)
    try:
        if migrate:
            await _migrate(engine)
        else:
            async with translate_errors(), engine.connect() as connection:
                await connection.execute(select(literal(1)))
    except BaseException:
        await engine.dispose()
        raise
    return Store(engine)
