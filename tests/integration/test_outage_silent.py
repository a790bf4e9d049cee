"""A store that stops answering silently (README "Freshness, outages and several instances").

Real PostgreSQL behind a loopback relay whose `blackhole()` forwards nothing either way
and closes nothing, as a link that drops packets does: queries hang in the driver instead
of failing. `cache.outage_grace` must still hold: a cached identity is refused once the
last successful poll of the change feed is older than the grace, whatever poll is still
in flight, and a token that needs the store gets its 503 within the store timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from gateway.app import Gateway
from gateway.config import load_config
from gateway.services import Directory
from gateway.store import open_store
from tests.conftest import fresh_pg_database, proxy_test_server, write_config

GRACE = 1.0
POLL_INTERVAL = 0.25  # the change feed's
# The longest any store call may take (half the grace, between 0.5 and 2 s): far below
# asyncpg's command_timeout of 10 s, which a silent store used to cost.
STORE_TIMEOUT = 2.0
STORE_TIMEOUT_NO_GRACE = 0.5
SLACK = 0.5  # scheduling and request time on a busy test machine


class SilentRelay:
    """A loopback TCP relay to PostgreSQL that can go silent without closing anything."""

    def __init__(self, target_port: int = 5432) -> None:
        self._target = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        """Listen on a free loopback port (`port`)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers.update({writer, up_writer})

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    # Held, not dropped: TCP would resend it once the link is back.
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def blackhole(self) -> None:
        """Stop forwarding in both directions; connections stay open, new ones are accepted."""
        self._flowing.clear()

    def restore(self) -> None:
        """Forward again, what was held first."""
        self._flowing.set()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.restore()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def silent_pg() -> AsyncIterator[tuple[str, str, SilentRelay]]:
    """(URL through the relay, direct URL, relay) of a fresh PostgreSQL database."""
    async with fresh_pg_database() as direct:
        relay = SilentRelay()
        await relay.start()
        try:
            yield direct.replace("@127.0.0.1:5432/", f"@127.0.0.1:{relay.port}/"), direct, relay
        finally:
            await relay.close()


@dataclass
class Running:
    """A gateway started by `start_gateway`, with clients on both listeners."""

    gateway: Gateway
    proxy: TestClient
    admin: TestClient


@pytest.fixture
async def start_gateway(
    tmp_path: Path, upstream: TestServer
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Factory: the real gateway on the given store URL with `cache.outage_grace` (default GRACE)."""
    started: list[Running] = []

    async def start(store_url: str, grace: float = GRACE) -> Running:
        path = write_config(
            tmp_path,
            store_url=store_url,
            upstream_url=str(upstream.make_url("")).rstrip("/"),
            extra_yaml=f"cache:\n  outage_grace: {grace}\n",
        )
        gateway = await Gateway.open(load_config(path, env={}))
        proxy = TestClient(proxy_test_server(gateway))
        admin = TestClient(TestServer(build_admin_app(gateway.admin_context()), host="127.0.0.1"))
        await proxy.start_server()
        await admin.start_server()
        running = Running(gateway, proxy, admin)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.proxy.close()
        await running.admin.close()
        await running.gateway.close()


@contextlib.contextmanager
def restored(relay: SilentRelay) -> Iterator[None]:
    """Forward again on the way out, even when an assertion failed: closing the gateway needs the store."""
    try:
        yield
    finally:
        relay.restore()


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for `token`."""
    return {"Authorization": f"Bearer {token}"}


async def timed_get(client: TestClient, token: str) -> tuple[ClientResponse, float]:
    """GET /echo/a with `token`: the response (read) and the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.get("/echo/a", headers=bearer(token))
    await response.read()
    return response, loop.time() - started


async def until_status(client: TestClient, token: str, status: int, *, within: float) -> ClientResponse:
    """Send with `token` until the answer has `status`; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        response = await client.get("/echo/a", headers=bearer(token))
        await response.read()
        if response.status == status:
            return response
        assert loop.time() < deadline, f"still {response.status} after {within:g}s: {await response.text()}"
        await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], *, within: float) -> None:
    """Wait until `condition()` holds; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, f"not within {within:g}s"
        await asyncio.sleep(0.02)


async def test_silent_store_refuses_cached_tokens_after_the_grace(
    silent_pg: tuple[str, str, SilentRelay],
    start_gateway: Callable[..., Awaitable[Running]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    relayed, direct, relay = silent_pg
    running = await start_gateway(relayed)
    gateway, proxy, admin = running.gateway, running.proxy, running.admin
    await gateway.directory.create_user("svc", actor="test", roles=["writer"])
    _, cached = await gateway.directory.create_token("svc", "cached", actor="test")
    _, fresh = await gateway.directory.create_token("svc", "fresh", actor="test")
    _, late = await gateway.directory.create_token("svc", "late", actor="test")
    await gateway.catch_up()  # the feed has seen the creations: no eviction of `cached` to come
    assert (await proxy.get("/echo/a", headers=bearer(cached))).status == 200  # now cached
    assert (await admin.get("/readyz")).status == 200
    assert gateway.feed.healthy

    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="gateway.changefeed"), restored(relay):
        relay.blackhole()
        silent_since = loop.time()
        # Within the grace the cached identity still works (the last poll is under a poll old).
        assert (await proxy.get("/echo/a", headers=bearer(cached))).status == 200
        # An uncached token needs the store, which does not answer: 503 within the bound.
        fresh_lookup = asyncio.create_task(timed_get(proxy, fresh))

        refused = await until_status(proxy, cached, 503, within=GRACE + SLACK)
        waited = loop.time() - silent_since
        assert (await refused.json())["error"] == "store_unavailable"
        assert GRACE - POLL_INTERVAL - SLACK <= waited <= GRACE + SLACK, waited
        assert not gateway.feed.healthy  # the stuck poll was given up: /metrics shows it

        response, took = await fresh_lookup
        assert response.status == 503 and (await response.json())["error"] == "store_unavailable"
        assert took <= STORE_TIMEOUT + SLACK, took

        # Past the grace a token that is not cached gets its 503 at once: no query is tried.
        response, took = await timed_get(proxy, late)
        assert response.status == 503 and took < SLACK, took

        # Another instance (the CLI, direct to the store) expires the cached token meanwhile.
        other = await open_store(direct, migrate=False)
        try:
            await Directory(other, lambda: gateway.pipeline.settings.table).expire_token(
                "svc", "cached", actor="test"
            )
        finally:
            await other.close()
        assert (await proxy.get("/echo/a", headers=bearer(cached))).status == 503

        relay.restore()
        # The poll loop went on through the timeouts: the change arrives, and the store answers again.
        recovered = await until_status(
            proxy, cached, 401, within=2 * STORE_TIMEOUT + POLL_INTERVAL + 2 * SLACK
        )
        assert (await recovered.json())["error"] == "token_expired"
        assert (await proxy.get("/echo/a", headers=bearer(fresh))).status == 200
        assert (await proxy.get("/echo/a", headers=bearer(late))).status == 200
        assert (await admin.get("/readyz")).status == 200
        await until(lambda: gateway.feed.healthy, within=SLACK)
    messages = [record.getMessage() for record in caplog.records]
    assert any("store unreachable" in message for message in messages), messages
    assert any("store reachable again" in message for message in messages), messages


async def test_silent_store_grace_zero_refuses_within_a_poll(
    silent_pg: tuple[str, str, SilentRelay],
    start_gateway: Callable[..., Awaitable[Running]],
) -> None:
    relayed, _, relay = silent_pg
    running = await start_gateway(relayed, grace=0)
    gateway, proxy = running.gateway, running.proxy
    await gateway.directory.create_user("svc", actor="test", roles=["writer"])
    _, cached = await gateway.directory.create_token("svc", "cached", actor="test")
    await gateway.catch_up()
    assert (await proxy.get("/echo/a", headers=bearer(cached))).status == 200
    loop = asyncio.get_running_loop()
    with restored(relay):
        relay.blackhole()
        silent_since = loop.time()
        # No grace: refused as soon as a poll is overdue (an interval plus the store timeout).
        bound = POLL_INTERVAL + STORE_TIMEOUT_NO_GRACE + SLACK
        await until_status(proxy, cached, 503, within=bound)
        assert loop.time() - silent_since <= bound
        relay.restore()
        await until_status(proxy, cached, 200, within=2 * STORE_TIMEOUT_NO_GRACE + POLL_INTERVAL + SLACK)
