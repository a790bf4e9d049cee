"""The identity cache, the shared lookup, last use and the feed's trust, on real stores with fake clocks.

Every store query is observed, never faked: a `before_cursor_execute` listener on the
real engine counts the token lookups each step makes (SQLite and PostgreSQL). The stores
come from a running gateway (the harness), whose own cache these tests leave alone: each
builds its own Authenticator, TokenCache or ChangeFeed on that store with fake clocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from gateway import tokens
from gateway.auth import Authenticator, LastUsed, LookupsBusy, TokenCache
from gateway.changefeed import ChangeFeed
from gateway.errors import Refusal, StoreUnavailable, Unauthenticated
from gateway.store import Store, open_store
from tests.conftest import Harness


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(harness: Harness) -> Store:
    """The running gateway's real store (SQLite file or PostgreSQL)."""
    return harness.gateway.store


@contextmanager
def on_lookup(store: Store, action: Any = None) -> Iterator[list[str]]:
    """Every token lookup statement the store runs inside the block; `action()` runs as each is sent."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, _many: bool) -> None:
        if "tokens" in statement and "digest" in statement:
            seen.append(statement)
            if action is not None:
                action()

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)


def authenticator(store: Store, cache: TokenCache, **options: Any) -> Authenticator:
    """An Authenticator of its own on `store`, with a store it always trusts."""
    return Authenticator(store, cache, LastUsed(), store_trusted=lambda: True, **options)


def cache(timer: FakeClock | None = None, *, ttl: float = 60, negative_ttl: float = 5) -> TokenCache:
    """A TokenCache on a fake timer."""
    return TokenCache(ttl=ttl, negative_ttl=negative_ttl, max_entries=100, timer=timer or FakeClock())


async def new_token(harness: Harness, user: str = "svc") -> str:
    """A new token of service user `user` (created with role reader if needed)."""
    return await harness.token(user, roles=["reader"])


async def refused_as_unknown(auth: Authenticator, token: str) -> None:
    """Assert that `token` is refused as unknown (401 invalid_token)."""
    with pytest.raises(Unauthenticated) as refused:
        await auth.authenticate([f"Bearer {token}"])
    assert refused.value.refusal is Refusal.INVALID_TOKEN
    assert "unknown" in refused.value.message


async def test_unknown_token_is_remembered_for_negative_ttl_only(store: Store) -> None:
    timer = FakeClock()
    auth = authenticator(store, cache(timer, negative_ttl=5))
    junk = tokens.generate()  # well formed (the checksum is public), known to no store
    with on_lookup(store) as lookups:
        for _ in range(3):
            await refused_as_unknown(auth, junk)
        assert len(lookups) == 1
        timer.now += 4.9
        await refused_as_unknown(auth, junk)
        assert len(lookups) == 1
        timer.now += 0.2  # past negative_ttl: asked again
        await refused_as_unknown(auth, junk)
        assert len(lookups) == 2


async def test_negative_ttl_zero_remembers_nothing(store: Store) -> None:
    auth = authenticator(store, cache(negative_ttl=0))
    junk = tokens.generate()
    with on_lookup(store) as lookups:
        await refused_as_unknown(auth, junk)
        await refused_as_unknown(auth, junk)
    assert len(lookups) == 2


async def test_known_token_is_cached_until_ttl(store: Store, harness: Harness) -> None:
    timer = FakeClock()
    auth = authenticator(store, cache(timer, ttl=60))
    secret = await new_token(harness)
    with on_lookup(store) as lookups:
        first = await auth.authenticate([f"Bearer {secret}"])
        for _ in range(3):
            assert await auth.authenticate([f"Bearer {secret}"]) == first
        assert len(lookups) == 1
        assert (auth.cache_hits, auth.cache_misses) == (3, 1)
        timer.now += 60.1
        await auth.authenticate([f"Bearer {secret}"])
        assert len(lookups) == 2


@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown"])
async def test_concurrent_requests_for_one_token_make_one_query(
    store: Store, harness: Harness, known: bool
) -> None:
    auth = authenticator(store, cache())
    secret = await new_token(harness) if known else tokens.generate()
    with on_lookup(store) as lookups:
        results = await asyncio.gather(
            *(auth.authenticate([f"Bearer {secret}"]) for _ in range(20)), return_exceptions=True
        )
    assert len(lookups) == 1
    if known:
        assert all(not isinstance(result, BaseException) for result in results), results
        assert len({result.token_id for result in results if not isinstance(result, BaseException)}) == 1
    else:
        assert all(isinstance(result, Unauthenticated) for result in results), results
    assert auth.cache_misses == 20


@pytest.mark.parametrize("queue", [0, 3])
async def test_lookups_beyond_the_cap_and_queue_are_refused_at_once(store: Store, queue: int) -> None:
    auth = authenticator(store, cache(), max_lookups=1, max_queued_lookups=queue)
    junk = [tokens.generate() for _ in range(20)]
    # Gathered: every request asks before the first lookup can have its answer.
    with on_lookup(store) as lookups:
        results = await asyncio.gather(
            *(auth.authenticate([f"Bearer {token}"]) for token in junk), return_exceptions=True
        )
    answered = [result for result in results if isinstance(result, Unauthenticated)]
    busy = [result for result in results if isinstance(result, LookupsBusy)]
    assert (len(answered), len(busy)) == (1 + queue, 19 - queue), results
    assert len(lookups) == 1 + queue
    assert all(error.headers() == {"Retry-After": "1"} for error in busy)
    # Nothing stays taken: the next one runs.
    await refused_as_unknown(auth, tokens.generate())


async def test_eviction_during_a_lookup_keeps_its_answer_out_of_the_cache(
    store: Store, harness: Harness
) -> None:
    token_cache = cache()
    auth = authenticator(store, token_cache)
    secret = await new_token(harness)
    # The change feed evicts the user while the store is answering (e.g. a token reset elsewhere).
    with on_lookup(store, lambda: token_cache.evict_user("svc")) as lookups:
        principal = await auth.authenticate([f"Bearer {secret}"])
    assert principal.user == "svc" and len(lookups) == 1
    assert token_cache.get(tokens.digest(secret)) is None
    with on_lookup(store) as lookups:
        await auth.authenticate([f"Bearer {secret}"])
        assert len(lookups) == 1  # asked again, and this answer is kept
        await auth.authenticate([f"Bearer {secret}"])
        assert len(lookups) == 1
    assert token_cache.get(tokens.digest(secret)) is not None


async def test_request_after_an_eviction_does_not_share_the_older_lookup(
    store: Store, harness: Harness
) -> None:
    token_cache = cache()
    auth = authenticator(store, token_cache)
    secret = await new_token(harness)
    joined: list[asyncio.Task[Any]] = []

    def evict_then_ask_again() -> None:
        if not joined:
            # The first lookup is on its way to the store; the user changes; a new request comes.
            token_cache.evict_user("svc")
            joined.append(asyncio.ensure_future(auth.authenticate([f"Bearer {secret}"])))

    with on_lookup(store, evict_then_ask_again) as lookups:
        first = await auth.authenticate([f"Bearer {secret}"])
        second = await joined[0]
    assert len(lookups) == 2  # the later request read the store itself
    assert first.token_id == second.token_id
    assert token_cache.get(tokens.digest(secret)) == second  # its answer, after the eviction, is kept


async def test_eviction_during_a_lookup_keeps_unknown_out_of_the_negative_cache(store: Store) -> None:
    token_cache = cache()
    auth = authenticator(store, token_cache)
    junk = tokens.generate()
    with on_lookup(store, lambda: token_cache.evict_user("someone")) as lookups:
        await refused_as_unknown(auth, junk)
    assert not token_cache.is_unknown(tokens.digest(junk))
    with on_lookup(store) as lookups:
        await refused_as_unknown(auth, junk)
        await refused_as_unknown(auth, junk)
    assert len(lookups) == 1


async def _last_used(harness: Harness, user: str = "svc") -> datetime | None:
    (token,) = await harness.directory.list_tokens(user)
    return token.last_used_at


async def test_last_used_is_written_at_most_once_per_30_seconds(store: Store, harness: Harness) -> None:
    wall = FakeClock(float(int(datetime.now(UTC).timestamp())))
    last_used = LastUsed()
    auth = Authenticator(store, cache(), last_used, store_trusted=lambda: True, wall_clock=wall)
    secret = await new_token(harness)
    started = wall.now
    await auth.authenticate([f"Bearer {secret}"])
    await last_used.flush(store)
    assert await _last_used(harness) == datetime.fromtimestamp(started, UTC)

    wall.now += 10
    await auth.authenticate([f"Bearer {secret}"])
    await last_used.flush(store)
    assert await _last_used(harness) == datetime.fromtimestamp(started, UTC)  # same 30 s window

    wall.now += 21
    await auth.authenticate([f"Bearer {secret}"])
    await last_used.flush(store)
    assert await _last_used(harness) == datetime.fromtimestamp(started + 31, UTC)


async def warmed(store: Store) -> Store:
    """The store after one unhurried poll. These tests share the running gateway's store, whose
    own feed holds a connection: on a busy two-core machine opening a second PostgreSQL
    connection can take longer than the 0.5 s a 1 s grace allows, and they test trust against
    the (fake) clock, not that timeout."""
    await ChangeFeed(store, cache(), store_timeout=30.0).poll()
    return store


async def test_feed_trusts_nothing_before_its_first_successful_poll(store: Store) -> None:
    feed = ChangeFeed(await warmed(store), cache(), outage_grace=1.0, clock=FakeClock())
    assert not feed.trusted() and not feed.healthy
    await feed.poll()
    assert feed.trusted() and feed.healthy


async def test_feed_trust_follows_only_the_last_successful_poll(store: Store) -> None:
    clock = FakeClock()
    feed = ChangeFeed(await warmed(store), cache(), outage_grace=1.0, clock=clock)
    await feed.poll()
    assert feed.trusted() and feed.healthy
    clock.now += 1.0
    assert feed.trusted()
    # No poll has completed since (one may be stuck in the driver): past the grace, refuse.
    clock.now += 0.01
    assert not feed.trusted()
    assert not feed.healthy
    await feed.poll()
    assert feed.trusted() and feed.healthy


async def lose_sqlite_file(store: Store, path: Path) -> None:
    """Make a real SQLite store unreachable: its pool is closed and its file moved away, so the
    next connection opens a new, empty file without the schema."""
    await store.close()
    path.rename(path.with_name("moved-away.db"))


async def test_feed_trust_lasts_the_grace_after_failed_polls(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = await open_store(f"sqlite+aiosqlite:///{path}")
    clock = FakeClock()
    feed = ChangeFeed(store, cache(), outage_grace=1.0, clock=clock)
    try:
        await feed.poll()
        await lose_sqlite_file(store, path)
        clock.now += 0.5
        await feed.poll()
        assert feed.trusted() and not feed.healthy  # within the grace
        clock.now += 0.51
        assert not feed.trusted()
    finally:
        await store.close()


async def test_feed_grace_zero_refuses_at_the_first_failed_poll(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    store = await open_store(f"sqlite+aiosqlite:///{path}")
    clock = FakeClock()
    feed = ChangeFeed(store, cache(), outage_grace=0.0, clock=clock)
    try:
        await feed.poll()
        clock.now += 0.3  # a healthy feed between two polls: still trusted, though older than the grace
        assert feed.trusted()
        await lose_sqlite_file(store, path)
        await feed.poll()
        assert not feed.trusted()
    finally:
        await store.close()


async def test_untrusted_store_refuses_uncached_tokens_without_a_query(
    store: Store, harness: Harness
) -> None:
    trusted = True
    auth = Authenticator(store, cache(), LastUsed(), store_trusted=lambda: trusted)
    secret = await new_token(harness)
    trusted = False
    with on_lookup(store) as lookups:
        with pytest.raises(StoreUnavailable):
            await auth.authenticate([f"Bearer {secret}"])
    assert lookups == []


@pytest.fixture
async def own_store(store_url: str) -> AsyncIterator[Store]:
    """A store of its own, with no gateway tasks running on it."""
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()


async def test_cancelled_poll_lets_its_store_call_end_before_it_returns(own_store: Store) -> None:
    feed = ChangeFeed(own_store, cache(), outage_grace=1.0)
    await feed.poll()
    before = asyncio.all_tasks()
    sent = asyncio.Event()
    with on_changes_query(own_store, sent.set):
        poll = asyncio.create_task(feed.poll())
        await sent.wait()  # the read is inside the store
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
    # Gateway.close() closes the store next: no store call of the feed may still be running.
    left = {task for task in asyncio.all_tasks() - before if not task.done()}
    assert left == set(), left


async def test_authenticator_close_waits_for_lookups_under_way(own_store: Store) -> None:
    auth = authenticator(own_store, cache())
    before = asyncio.all_tasks()
    sent = asyncio.Event()
    with on_lookup(own_store, sent.set):
        request = asyncio.create_task(auth.authenticate([f"Bearer {tokens.generate()}"]))
        await sent.wait()
        request.cancel()  # the client went away; the lookup itself goes on
        await auth.close()
    left = {task for task in asyncio.all_tasks() - before if not task.done()} - {request}
    assert left == set(), left


@contextmanager
def on_changes_query(store: Store, action: Any) -> Iterator[None]:
    """Run `action()` as the store sends a change-feed query."""

    def before(_conn: Any, _cursor: Any, statement: str, _params: Any, _ctx: Any, _many: bool) -> None:
        if "changes" in statement:
            action()

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)
