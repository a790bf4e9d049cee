"""Retention and push revocation (README "Retention", "Freshness"), on SQLite and PostgreSQL.

- Old change-feed and audit rows go in batches; nothing newer, and never the newest change.
- A gateway whose cursor fell below what retention removed drops every cached identity and
  reads everything again before its feed counts as healthy: a pause never skips a revocation.
- On PostgreSQL a change wakes other instances at once (LISTEN/NOTIFY), also after the
  listening connection was killed; the poll alone would take up to its interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select, update

from gateway.app import Gateway
from gateway.config import RetentionConfig, load_config
from gateway.errors import ConfigError
from gateway.models import AuditEvent, Change, FeedHorizon
from gateway.retention import Retention
from gateway.timeparse import utcnow
from tests.conftest import PG_ADMIN_DSN, Harness, write_config

OLD = timedelta(hours=2)


async def _backdate(gateway: Gateway, table: type[Change] | type[AuditEvent], by: timedelta) -> None:
    async with gateway.store.write_sessions() as session, session.begin():
        await session.execute(update(table).values(at=utcnow() - by))


async def _count(gateway: Gateway, table: type[Change] | type[AuditEvent]) -> int:
    async with gateway.store.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def _horizon(gateway: Gateway) -> int:
    async with gateway.store.sessions() as session:
        return int(await session.scalar(select(FeedHorizon.below)) or 0)


async def _status(harness: Harness, token: str) -> int:
    async with await harness.send("GET", "/echo/a", headers={"Authorization": f"Bearer {token}"}) as answer:
        return answer.status


def _stop_feed(gateway: Gateway) -> None:
    """Stand for a paused or partitioned instance: its feed no longer polls by itself."""
    for task in gateway._tasks:
        if task.get_name() == "change-feed":
            task.cancel()


async def test_prune_removes_old_rows_in_batches_keeping_the_newest_change(harness: Harness) -> None:
    gateway = harness.gateway
    for index in range(7):
        await harness.directory.create_user(f"old{index}", actor="test", roles=["reader"])
    await _backdate(gateway, Change, OLD)
    await _backdate(gateway, AuditEvent, timedelta(days=400))
    async with gateway.store.sessions() as session:
        old_ids = sorted((await session.scalars(select(Change.id))).all())
    old_events = await _count(gateway, AuditEvent)  # the users' and the first signing key's
    await harness.directory.create_user("new", actor="test", roles=["reader"])
    deleted: list[tuple[str, int]] = []
    retention = Retention(
        gateway.store,
        lambda: RetentionConfig(),
        batch=3,
        on_deleted=lambda table, count: deleted.append((table, count)),
    )

    assert len(old_ids) == 7 and old_events == 8
    assert await retention.prune() == {"changes": 7, "audit_events": 8}
    assert deleted == [
        ("changes", 3),
        ("changes", 3),
        ("changes", 1),
        ("audit_events", 3),
        ("audit_events", 3),
        ("audit_events", 2),
    ]
    assert await _count(gateway, Change) == 1  # the new user's
    assert await _count(gateway, AuditEvent) == 1
    assert await _horizon(gateway) == old_ids[-1]
    assert await retention.prune() == {"changes": 0, "audit_events": 0}

    # All old now: the newest change stays all the same (an id must never be handed out twice).
    await _backdate(gateway, Change, OLD)
    await _backdate(gateway, AuditEvent, timedelta(days=400))
    assert await retention.prune() == {"changes": 0, "audit_events": 1}
    assert await _count(gateway, Change) == 1
    await harness.directory.create_user("newer", actor="test", roles=["reader"])
    async with gateway.store.sessions() as session:
        assert min((await session.scalars(select(Change.id))).all()) > old_ids[-1]


async def test_prune_keeps_what_is_younger_and_what_is_kept_for_ever(harness: Harness) -> None:
    gateway = harness.gateway
    for index in range(3):
        await harness.directory.create_user(f"u{index}", actor="test", roles=["reader"])
    await _backdate(gateway, Change, timedelta(minutes=50))
    await _backdate(gateway, AuditEvent, timedelta(days=400))
    retention = Retention(gateway.store, lambda: RetentionConfig(changes=3600.0, audit_events=None))
    assert await retention.prune() == {"changes": 0, "audit_events": 0}
    assert await _count(gateway, Change) == 3 and await _count(gateway, AuditEvent) == 4  # + signing key
    assert await _horizon(gateway) == 0


async def test_an_instance_behind_retention_drops_its_cache_and_refuses_the_revoked_token(
    make_harness: Callable[..., Awaitable[Harness]],
) -> None:
    paused = await make_harness()
    token = await paused.token("svc")
    _stop_feed(paused.gateway)
    await paused.gateway.feed.poll()  # the token's creation read: a lookup racing it is not cached
    assert await _status(paused, token) == 200
    assert len(paused.gateway.cache) == 1

    # While it is away: the token is revoked, more changes follow, and an hour passes.
    await paused.directory.expire_token("svc", "t0", actor="test")
    await paused.directory.create_user("later", actor="test", roles=["reader"])
    await _backdate(paused.gateway, Change, OLD)
    retention = Retention(paused.gateway.store, lambda: RetentionConfig())
    removed = await retention.prune()
    assert removed["changes"] >= 2  # the expiry among them
    assert await _status(paused, token) == 200  # still in its cache: nothing told it yet

    # Its next read finds its cursor below the horizon; /readyz is 503 until it has read again.
    released = asyncio.Event()
    seen_healthy: list[bool] = []

    async def slow_reset() -> None:
        seen_healthy.append(paused.gateway.feed.healthy)
        await released.wait()

    paused.gateway.feed.subscribe_reset(slow_reset)
    poll = asyncio.create_task(paused.gateway.feed.poll())
    for _ in range(200):
        if seen_healthy or poll.done():
            break
        await asyncio.sleep(0.01)
    assert seen_healthy == [False], "the feed did not read everything again"
    released.set()
    await poll
    assert paused.gateway.feed.healthy
    assert len(paused.gateway.cache) == 0
    assert await _status(paused, token) == 401
    # And it follows the feed from there on.
    other = await paused.token("svc2")
    assert await _status(paused, other) == 200
    await paused.directory.expire_token("svc2", "t0", actor="test")
    await paused.gateway.feed.poll()
    assert await _status(paused, other) == 401


async def test_an_instance_that_kept_up_is_not_reset(harness: Harness) -> None:
    token = await harness.token("svc")
    _stop_feed(harness.gateway)
    await harness.gateway.feed.poll()
    assert await _status(harness, token) == 200
    await harness.directory.create_user("later", actor="test", roles=["reader"])
    await harness.gateway.feed.poll()
    await _backdate(harness.gateway, Change, OLD)
    await Retention(harness.gateway.store, lambda: RetentionConfig()).prune()
    await harness.gateway.feed.poll()
    assert len(harness.gateway.cache) == 1  # the feed's cursor was past every removed row


async def _listeners(database: str) -> list[int]:
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        rows = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'", database
        )
        return [row["pid"] for row in rows]
    finally:
        await admin.close()


async def _refused_within(harness: Harness, token: str, seconds: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if await _status(harness, token) == 401:
            return time.monotonic() - started
        await asyncio.sleep(0.005)
    return None


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_postgresql_pushes_changes_to_other_instances_also_after_reconnecting(
    make_harness: Callable[..., Awaitable[Harness]], store_url: str
) -> None:
    writer = await make_harness()
    reader = await make_harness()
    # The poll alone would take 30 s now: only a notification can be this quick.
    reader.gateway.feed._interval = 30.0
    await asyncio.sleep(0.3)  # its notification connection is up
    reader.gateway.feed.wake.set()
    token = await writer.token("svc")
    assert await _status(reader, token) == 200
    await writer.directory.expire_token("svc", "t0", actor="test")
    delay = await _refused_within(reader, token, 2.0)
    assert delay is not None and delay < 0.5, delay

    # The listening connection dies (a failover, a restart): it comes back and pushes again.
    database = store_url.rsplit("/", 1)[1]
    pids = await _listeners(database)
    assert len(pids) == 2  # one per instance
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
    finally:
        await admin.close()
    for _ in range(100):
        if len(await _listeners(database)) == 2:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the notification connections did not come back")
    token = await writer.token("svc3")
    assert await _status(reader, token) == 200
    await writer.directory.expire_token("svc3", "t0", actor="test")
    delay = await _refused_within(reader, token, 2.0)
    assert delay is not None and delay < 0.5, delay


@pytest.mark.parametrize(
    ("retention", "problem"),
    [
        ("{changes: 10s}", "store.retention.changes: must be at least 1m (or never), not '10s'"),
        ("{audit_events: 1w}", "store.retention.audit_events: '1w' is not a duration"),
        ("{changes: -5}", "store.retention.changes: -5 is not a duration: it must be longer than zero"),
        ("{changes: true}", "store.retention.changes: True is not a duration"),
        ("{changez: 1h}", "changez"),
        ("5", "store.retention"),
    ],
)
def test_bad_retention_is_refused_naming_the_field(tmp_path: Path, retention: str, problem: str) -> None:
    config = write_config(
        tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url="http://127.0.0.1:9"
    )
    config.write_text(
        config.read_text().replace('store:\n  url: "sqlite+aiosqlite:///gateway.db"\n', "")
        + f'store:\n  url: "sqlite+aiosqlite:///gateway.db"\n  retention: {retention}\n'
    )
    with pytest.raises(ConfigError) as refused:
        load_config(config, env={})
    assert any(problem in line and "gateway.yaml:" in line for line in refused.value.problems), (
        refused.value.problems
    )


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        ("{}", RetentionConfig(3600.0, 365 * 86400.0)),
        ("{changes: 2h, audit_events: never}", RetentionConfig(7200.0, None)),
        ("{changes: 90, audit_events: 30d}", RetentionConfig(90.0, 30 * 86400.0)),
    ],
)
def test_retention_reads_durations_and_never(
    tmp_path: Path, retention: str, expected: RetentionConfig
) -> None:
    config = write_config(
        tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url="http://127.0.0.1:9"
    )
    config.write_text(
        config.read_text().replace('store:\n  url: "sqlite+aiosqlite:///gateway.db"\n', "")
        + f'store:\n  url: "sqlite+aiosqlite:///gateway.db"\n  retention: {retention}\n'
    )
    assert load_config(config, env={}).retention == expected
