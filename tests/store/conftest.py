"""Fixtures of the store/service/CLI tests: real SQLite files and real PostgreSQL databases."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.services import Directory
from gateway.store import Store, open_store

PG_ADMIN_DSN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROLES = frozenset({"service-user-project-admin", "reader", "writer", "other"})
ACTOR = "test:admin"


def pg_unavailable(reason: str) -> None:
    """Fail in CI (PostgreSQL is part of the test matrix there), skip elsewhere."""
    message = f"PostgreSQL at {PG_ADMIN_DSN} is needed: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


async def _pg_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pg_unavailable(f"{type(exc).__name__}: {exc}")
        raise  # unreachable: skip/fail raise


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a fresh, empty store: a SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    name = "gw_" + secrets.token_hex(6)
    admin = await _pg_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open, migrated store."""
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def defined_roles() -> set[str]:
    """The roles policies/ defines for the directory (mutable: tests may drop one)."""
    return set(ROLES)


@pytest.fixture
def directory(store: Store, defined_roles: set[str]) -> Directory:
    """The service layer over the store, with ROLES defined."""
    roles: Callable[[], frozenset[str]] = lambda: frozenset(defined_roles)  # noqa: E731
    return Directory(store, roles)
