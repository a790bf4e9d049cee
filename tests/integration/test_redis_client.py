"""gateway.redis_client and RedisStore against the real Redis: pipelining, failures, no secrets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_py

from gateway.limiter import Check, RedisStore, StoreFailed
from gateway.ratelimit import Limit
from gateway.redis_client import RedisClient, RedisFailure, encode, parse_redis_url
from tests.process import free_port


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis_py.Redis]:
    client = redis_py.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    await client.aclose()


def test_urls_and_encoding() -> None:
    address = parse_redis_url("rediss://us%40er:p%3Ass@cache.internal:6380/4")
    assert (address.host, address.port, address.database, address.tls) == ("cache.internal", 6380, 4, True)
    assert (address.username, address.password) == ("us@er", "p:ss")
    assert "p:ss" not in repr(address)
    plain = parse_redis_url("redis://127.0.0.1")
    assert (plain.port, plain.database, plain.tls, plain.password) == (6379, 0, False, None)
    assert encode(("SET", "k", 10)) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n10\r\n"


async def test_pipelined_replies_reach_their_own_callers(redis_url: str, admin: redis_py.Redis) -> None:
    client = RedisClient(redis_url, timeout=2)
    try:
        # 500 commands in flight on one connection: each caller must get its own reply.
        replies = await asyncio.gather(*(client.call("ECHO", f"value-{n}") for n in range(500)))
        assert replies == [f"value-{n}".encode() for n in range(500)]
        await client.call("SET", "gateway:test:k", "v")
        assert await admin.get("gateway:test:k") == b"v"  # the URL's database, not 0
    finally:
        await client.close()


async def test_an_error_reply_fails_only_its_own_command(redis_url: str) -> None:
    client = RedisClient(redis_url, timeout=2)
    try:
        bad, good = await asyncio.gather(
            client.call("NOSUCHCOMMAND"), client.call("PING"), return_exceptions=True
        )
        assert isinstance(bad, RedisFailure) and "unknown command" in str(bad).lower()
        assert good == b"PONG"
    finally:
        await client.close()


async def test_a_refused_connection_fails_fast_and_never_shows_the_password() -> None:
    url = f"redis://user:s3cretpw@127.0.0.1:{free_port()}/0"
    client = RedisClient(url, timeout=0.25)
    started = time.monotonic()
    with pytest.raises(RedisFailure) as caught:
        await client.call("PING")
    assert time.monotonic() - started < 1.0
    assert "s3cretpw" not in str(caught.value) and "user" not in str(caught.value)


async def test_a_wrong_password_is_refused_without_quoting_it(redis_url: str) -> None:
    # The test Redis has no password: AUTH is refused with Redis's own words, not ours.
    url = redis_url.replace("redis://", "redis://someone:s3cretpw@")
    client = RedisClient(url, timeout=2)
    with pytest.raises(RedisFailure) as caught:
        await client.call("PING")
    assert "AUTH" in str(caught.value) and "s3cretpw" not in str(caught.value)
    await client.close()


async def test_a_paused_redis_is_waited_for_at_most_the_timeout(
    redis_url: str, admin: redis_py.Redis
) -> None:
    client = RedisClient(redis_url, timeout=0.25)
    try:
        assert await client.call("PING") == b"PONG"
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        started = time.monotonic()
        with pytest.raises(RedisFailure, match="in time"):
            await client.call("GET", "gateway:test:paused")
        assert time.monotonic() - started < 0.8
        # After the pause the same connection answers again, replies still matched in order
        # (the timed-out command's late reply is dropped, not handed to the next caller).
        deadline = time.monotonic() + 5
        while True:
            try:
                assert await client.call("ECHO", "after") == b"after"
                break
            except RedisFailure:
                assert time.monotonic() < deadline, "Redis did not answer after its pause"
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await client.close()


async def test_a_killed_connection_is_opened_again(redis_url: str, admin: redis_py.Redis) -> None:
    client = RedisClient(redis_url, timeout=1)
    try:
        first = await client.call("CLIENT", "ID")
        await admin.execute_command("CLIENT", "KILL", "ID", str(first))
        await asyncio.sleep(0.05)
        # The closed connection is noticed; the next command opens a new one.
        assert await client.call("CLIENT", "ID") != first
        assert await client.call("PING") == b"PONG"
    finally:
        await client.close()


async def test_the_script_is_loaded_again_after_a_flush(redis_url: str, admin: redis_py.Redis) -> None:
    store = RedisStore(redis_url)
    limit = Limit(rate=10, per=1.0, burst=2)
    checks = (Check("user", "u:flush", limit),)
    try:
        assert (await store.apply(checks, True))[0].allowed
        await admin.script_flush()
        # EVALSHA meets NOSCRIPT; EVAL runs (and caches) it: the count goes on, nothing lost.
        second = (await store.apply(checks, True))[0]
        assert second.allowed and second.remaining == 0
        assert not (await store.apply(checks, True))[0].allowed
    finally:
        await store.close()


async def test_store_failures_are_store_failed_not_redis_errors() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.25)
    with pytest.raises(StoreFailed):
        await store.apply((Check("user", "u:x", Limit(rate=1, per=1.0, burst=1)),), True)
    await store.close()


def test_the_connection_works_on_uvloop_as_gateway_serve_runs(redis_url: str) -> None:
    # uvloop's transports are not asyncio.Transport subclasses: nothing may assume they are.
    uvloop = pytest.importorskip("uvloop")

    async def calls() -> list[object]:
        client = RedisClient(redis_url, timeout=2)
        try:
            return list(await asyncio.gather(*(client.call("ECHO", str(n)) for n in range(50))))
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(calls()) == [str(n).encode() for n in range(50)]


@pytest.mark.parametrize("make_store", ["memory", "redis"])
async def test_a_stricter_limits_debt_becomes_an_empty_bucket_on_both_stores(
    redis_url: str, make_store: str
) -> None:
    from gateway.limiter import LimitStore, MemoryStore

    store: LimitStore = MemoryStore() if make_store == "memory" else RedisStore(redis_url, timeout=2)
    strict, loose = Limit(rate=2, per=3600.0, burst=2), Limit(rate=10, per=1.0, burst=5)
    try:
        for _ in range(2):
            assert (await store.apply((Check("user", "u:clamp", strict),), True))[0].allowed
        refused = (await store.apply((Check("user", "u:clamp", loose),), True))[0]
        assert not refused.allowed and refused.retry_after <= 0.11  # not an hour
        await asyncio.sleep(0.15)
        assert (await store.apply((Check("user", "u:clamp", loose),), True))[0].allowed
    finally:
        await store.close()
