"""Fixtures of the store/service/CLI tests: real SQLite files and real PostgreSQL databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import text

from gateway.models import Base
from gateway.policy import Role, RouteTable
from gateway.services import Directory
from gateway.store import Store, open_store
from tests.conftest import create_pg_database, drop_pg_database

T = TypeVar("T")

ROLES = frozenset({"service-user-project-admin", "reader", "writer", "other"})
INCLUDES = {"writer": ("reader",)}  # as in tests/conftest.py's DEFAULT_POLICIES
ACTOR = "test:admin"


def _run_aside(work: Callable[[], Coroutine[None, None, T]]) -> T:
    """Run `work` to completion on a fresh event loop in another thread (skips propagate)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


@pytest.fixture(scope="session")
def shared_pg_url() -> Iterator[str]:
    """One PostgreSQL database for the whole session (creating one per test costs ~1 s).

    Built on its own thread and event loop: it may be requested from inside a running
    test loop, and each test opens its own engine on its own loop anyway.
    """
    url = _run_aside(create_pg_database)
    try:
        yield url
    finally:
        _run_aside(lambda: drop_pg_database(url))


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An open, migrated, empty store: a new SQLite file, or the session's PostgreSQL database
    emptied (ids restarted) for this test."""
    if request.param == "sqlite":
        opened = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    else:
        opened = await open_store(request.getfixturevalue("shared_pg_url"))
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        async with opened.engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def defined_roles() -> set[str]:
    """The roles policies/ defines for the directory (mutable: tests may drop one)."""
    return set(ROLES)


def role_table(names: Iterable[str]) -> RouteTable:
    """A real RouteTable (no routes) defining `names`, with INCLUDES among them."""
    defined = set(names)
    return RouteTable(
        {
            name: Role(name, None, (), tuple(i for i in INCLUDES.get(name, ()) if i in defined), "test")
            for name in defined
        },
        (),
    )


@pytest.fixture
def directory(store: Store, defined_roles: set[str]) -> Directory:
    """The service layer over the store, with ROLES defined (`writer` includes `reader`)."""
    return Directory(store, lambda: role_table(defined_roles))
