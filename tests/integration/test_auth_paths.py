"""Authentication through the real proxy: admin tokens, last use, and the cap on store lookups.

The slow store is real: a transaction on the real PostgreSQL holds an ACCESS EXCLUSIVE
lock on `tokens`, so every lookup waits inside the server, where `pg_stat_activity`
shows how many the store is working on at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest

from gateway import tokens
from gateway.auth import Authenticator, LastUsed, LookupsBusy, TokenCache
from gateway.errors import Refusal, StoreUnavailable, Unauthenticated
from tests.conftest import Harness


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for `token`."""
    return {"Authorization": f"Bearer {token}"}


async def test_admin_token_on_the_proxy_is_forbidden_as_an_admin_token(harness: Harness) -> None:
    await harness.directory.create_user("root-admin", actor="test", admin=True)
    _, secret = await harness.directory.create_token("root-admin", "adm", actor="test")
    response = await harness.client.get("/echo/a", headers=bearer(secret))
    assert response.status == 403
    assert await response.json() == {
        "error": "forbidden",
        "detail": "admin tokens are for the admin API only; they never pass the proxy",
    }


async def test_proxied_request_records_last_used_once_per_window(harness: Harness) -> None:
    token = await harness.token("svc", roles=["reader"])
    (before,) = await harness.directory.list_tokens("svc")
    assert before.last_used_at is None
    sent = datetime.now(UTC)
    assert (await harness.client.get("/echo/a", headers=bearer(token))).status == 200
    received = datetime.now(UTC)
    await harness.gateway._flush_once()  # what the gateway's housekeeping does every 15 s
    (after,) = await harness.directory.list_tokens("svc")
    assert after.last_used_at is not None
    assert sent.replace(microsecond=0) <= after.last_used_at <= received, (sent, after.last_used_at, received)

    # Used again within 30 s: nothing new to write (last_used_at may be a minute stale).
    assert (await harness.client.get("/echo/a", headers=bearer(token))).status == 200
    await harness.gateway._flush_once()
    (again,) = await harness.directory.list_tokens("svc")
    assert again.last_used_at == after.last_used_at


def pg_dsn(store_url: str) -> str:
    """The asyncpg DSN of a SQLAlchemy PostgreSQL URL."""
    return store_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@asynccontextmanager
async def slow_token_lookups(store_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Every token lookup on this database waits inside PostgreSQL until the block ends.

    Yields a second connection for watching `pg_stat_activity` (not the locking one: within
    its transaction that view would stay the snapshot taken at the first look)."""
    locker = await asyncpg.connect(pg_dsn(store_url), timeout=5)
    watcher = await asyncpg.connect(pg_dsn(store_url), timeout=5)
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        try:
            yield watcher
        finally:
            await transaction.rollback()
    finally:
        await watcher.close()
        await locker.close()


async def waiting_lookups(connection: asyncpg.Connection) -> int:
    """Token lookups PostgreSQL is working on right now (all waiting for the lock)."""
    count = await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%digest%'"
    )
    return int(count)


async def until_waiting(connection: asyncpg.Connection, expected: int, within: float = 5.0) -> None:
    """Wait until `expected` lookups wait inside PostgreSQL; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (seen := await waiting_lookups(connection)) != expected:
        assert loop.time() < deadline, f"{seen} lookups waiting in the store, expected {expected}"
        await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until `condition()` holds; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not within {within:g}s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_store_lookups_are_capped_with_a_short_queue(harness: Harness, store_url: str) -> None:
    store = harness.gateway.store
    cache = TokenCache(ttl=60, negative_ttl=5, max_entries=100)
    auth = Authenticator(
        store, cache, LastUsed(), store_trusted=lambda: True, max_lookups=2, max_queued_lookups=1
    )
    junk = [tokens.generate() for _ in range(24)]
    loop = asyncio.get_running_loop()
    async with slow_token_lookups(store_url) as lock:
        held = [asyncio.create_task(auth.authenticate([f"Bearer {token}"])) for token in junk[:2]]
        await until_waiting(lock, 2)
        queued = asyncio.create_task(auth.authenticate([f"Bearer {junk[2]}"]))
        shared = asyncio.create_task(auth.authenticate([f"Bearer {junk[0]}"]))  # joins a held lookup
        await asyncio.sleep(0)  # let both take their places
        started = loop.time()
        excess = await asyncio.gather(
            *(auth.authenticate([f"Bearer {token}"]) for token in junk[3:]), return_exceptions=True
        )
        assert loop.time() - started < 0.5
        assert all(isinstance(error, LookupsBusy) for error in excess), excess
        error = excess[0]
        assert isinstance(error, LookupsBusy)
        assert error.status == 503 and error.refusal is Refusal.STORE_UNAVAILABLE
        assert error.message == "too many token lookups in progress; try again shortly"
        assert error.headers() == {"Retry-After": "1"}
        assert not (queued.done() or shared.done())
        assert await waiting_lookups(lock) == 2  # the store never saw more than the cap
    for task in [*held, queued, shared]:
        with pytest.raises(Unauthenticated):
            await task
    # The slots are free again: a lookup runs at once.
    with pytest.raises(Unauthenticated):
        await auth.authenticate([f"Bearer {tokens.generate()}"])


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_slow_lookups_time_out_and_give_their_slot_back(harness: Harness, store_url: str) -> None:
    store = harness.gateway.store
    cache = TokenCache(ttl=60, negative_ttl=5, max_entries=100)
    timeout = 1.0
    auth = Authenticator(
        store,
        cache,
        LastUsed(),
        store_trusted=lambda: True,
        store_timeout=timeout,
        max_lookups=1,
        max_queued_lookups=1,
    )
    loop = asyncio.get_running_loop()
    async with slow_token_lookups(store_url) as watcher:
        started = loop.time()
        held = asyncio.create_task(auth.authenticate([f"Bearer {tokens.generate()}"]))
        await until_waiting(watcher, 1)
        # Queued behind it for at most half the timeout, then refused as busy.
        with pytest.raises(LookupsBusy):
            await auth.authenticate([f"Bearer {tokens.generate()}"])
        assert loop.time() - started < timeout
        with pytest.raises(StoreUnavailable) as slow:
            await held
        assert not isinstance(slow.value, LookupsBusy)
        assert loop.time() - started < timeout + 0.5
        await until_waiting(watcher, 0)  # the cancelled query has left the store
    # The timed-out lookup gave its slot back.
    with pytest.raises(Unauthenticated):
        await auth.authenticate([f"Bearer {tokens.generate()}"])


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_proxy_answers_503_with_retry_after_when_lookups_are_full(
    harness: Harness, store_url: str
) -> None:
    authenticator = harness.gateway.authenticator
    authenticator.max_lookups = 1
    authenticator.max_queued_lookups = 0
    known = await harness.token("svc", roles=["reader"])
    await harness.settle()
    async with slow_token_lookups(store_url) as lock:
        held = asyncio.create_task(harness.client.get("/echo/a", headers=bearer(known)))
        await until_waiting(lock, 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = await harness.client.get("/echo/a", headers=bearer(tokens.generate()))
        assert loop.time() - started < 0.5
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert await refused.json() == {
            "error": "store_unavailable",
            "detail": "too many token lookups in progress; try again shortly",
        }
        # The same token as the held lookup shares it rather than taking a slot.
        misses = authenticator.cache_misses
        shared = asyncio.create_task(harness.client.get("/echo/a", headers=bearer(known)))
        await until(lambda: authenticator.cache_misses > misses)
        assert not shared.done()
        assert await waiting_lookups(lock) == 1
    assert (await held).status == 200
    assert (await shared).status == 200
