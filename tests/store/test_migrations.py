"""Schema migrations: create the schema, stay idempotent, run once under concurrency, match the models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from gateway.errors import ConfigError, StoreUnavailable
from gateway.models import Base
from gateway.store import Store, create_engine, head_revision, migrate, open_store

TABLES = {
    "service_users",
    "role_assignments",
    "allowed_origins",
    "tokens",
    "audit_events",
    "changes",
    "alembic_version",
}


def _schema(connection: Connection) -> tuple[set[str], dict[str, set[str]]]:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    indexes = {table: {ix["name"] or "" for ix in inspector.get_indexes(table)} for table in tables}
    return tables, indexes


async def _version(store: Store) -> list[str]:
    async with store.engine.connect() as connection:
        return list((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())


async def test_migrate_creates_every_table_and_index(store: Store) -> None:
    async with store.engine.connect() as connection:
        tables, indexes = await connection.run_sync(_schema)
    assert TABLES <= tables
    assert "ix_tokens_digest" in indexes["tokens"]
    assert {"ix_audit_events_at", "ix_audit_events_actor"} <= indexes["audit_events"]
    assert "ix_role_assignments_role" in indexes["role_assignments"]
    assert await _version(store) == [head_revision()]


async def test_migrate_is_idempotent(store_url: str) -> None:
    for _ in range(3):
        store = await open_store(store_url)
        try:
            assert await _version(store) == [head_revision()]
        finally:
            await store.close()


async def test_concurrent_migrations_all_succeed_once(store_url: str) -> None:
    engines = [create_engine(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        store = Store(engines[0])
        assert await _version(store) == [head_revision()]
    finally:
        for engine in engines:
            await engine.dispose()


async def test_migrations_match_the_models(store: Store) -> None:
    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with store.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    try:
        async with store.engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await connection.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar() == 5000
    finally:
        await store.close()


async def test_unreachable_postgresql_is_store_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await open_store("postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/nothing")
    assert time.monotonic() - started < 5
    assert caught.value.message == "the store cannot be reached"
    assert "hunter2" not in str(caught.value)


async def test_unreachable_store_after_open_raises_store_unavailable() -> None:
    store = Store(create_engine("postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/nothing"))
    try:
        assert "hunter2" not in store.url and "hunter2" not in repr(store)
        calls = (store.ping(), store.lookup_token("0" * 64), store.latest_change(), store.changes_since(0))
        for call in calls:
            with pytest.raises(StoreUnavailable, match="^the store cannot be reached$"):
                await call
    finally:
        await store.close()


async def test_sqlite_in_a_missing_directory_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable):
        await open_store(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'gw.db'}")
    # aiosqlite (0.22) stops the worker thread of a failed connect without awaiting it;
    # let the thread report back before this test's event loop closes.
    await asyncio.sleep(0.1)


@pytest.mark.parametrize("url", ["mysql+aiomysql://u@h/db", "not a url"])
async def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        await open_store(url)


async def test_a_schema_from_a_newer_gateway_is_refused_clearly(store: Store) -> None:
    set_version = text("UPDATE alembic_version SET version_num = :version")
    async with store.engine.begin() as connection:
        await connection.execute(set_version, {"version": "9999"})
    try:
        with pytest.raises(StoreUnavailable, match="newer version"):
            await migrate(store.engine)
    finally:  # the PostgreSQL database is shared by the session's tests
        async with store.engine.begin() as connection:
            await connection.execute(set_version, {"version": head_revision()})
