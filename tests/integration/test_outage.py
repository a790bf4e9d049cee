"""Store outages (CONTRACT.md "Freshness and outages") on the real PostgreSQL, behind a TCP relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import eventually, fresh_pg_database, proxy_test_server, write_config


class Relay:
    """A loopback TCP relay to PostgreSQL; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_port: int = 5432) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers.update({writer, up_writer})

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


@pytest.fixture
async def relayed_pg() -> AsyncIterator[tuple[str, Relay]]:
    async with fresh_pg_database() as url:
        relay = Relay()
        await relay.start()
        yield url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{relay.port}/"), relay
        with contextlib.suppress(AssertionError):
            await relay.cut()


GRACE = 1.5  # cache.outage_grace of the test, seconds


async def status_is(client: TestClient, path: str, headers: dict[str, str], status: int) -> bool:
    """Whether GET `path` now answers `status`."""
    response = await client.get(path, headers=headers)
    await response.read()
    return response.status == status


async def test_outage_grace_then_503_then_recovery(
    tmp_path: Path,
    upstream: TestServer,
    relayed_pg: tuple[str, Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, relay = relayed_pg
    path = write_config(
        tmp_path,
        store_url=url,
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        extra_yaml=f"cache:\n  outage_grace: {GRACE}\n",
    )
    gateway = await Gateway.open(load_config(path, env={}))
    proxy = TestClient(proxy_test_server(gateway))
    admin = TestClient(TestServer(build_admin_app(gateway.admin_context()), host="127.0.0.1"))
    await proxy.start_server()
    await admin.start_server()
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, known = await gateway.directory.create_token("svc", "known", actor="test")
        _, unknown = await gateway.directory.create_token("svc", "never-used", actor="test")
        headers = {"Authorization": f"Bearer {known}"}
        # The feed has read the creations: a lookup racing their eviction would not be cached.
        await gateway.catch_up()
        assert (await proxy.get("/echo/a", headers=headers)).status == 200  # now cached
        assert len(gateway.cache) == 1
        assert (await admin.get("/readyz")).status == 200

        with caplog.at_level(logging.WARNING, logger="gateway.changefeed"):
            await relay.cut()
            cut_at = time.monotonic()
            await eventually(lambda: status_is(admin, "/readyz", {}, 503))  # the feed notices
            if time.monotonic() - cut_at < GRACE:
                assert (await proxy.get("/echo/a", headers=headers)).status == 200  # within the grace
            fresh = await proxy.get("/echo/a", headers={"Authorization": f"Bearer {unknown}"})
            assert fresh.status == 503
            assert (await fresh.json())["error"] == "store_unavailable"
            await eventually(lambda: status_is(proxy, "/echo/a", headers, 503), within=GRACE + 1.0)
            assert time.monotonic() - cut_at >= GRACE - 0.1  # not before the grace ran out
            late = await proxy.get("/echo/a", headers=headers)
            assert (await late.json())["error"] == "store_unavailable"

            await relay.restore()
            await eventually(lambda: status_is(proxy, "/echo/a", headers, 200))
            assert (await proxy.get("/echo/a", headers={"Authorization": f"Bearer {unknown}"})).status == 200
            assert (await admin.get("/readyz")).status == 200
        messages = [record.getMessage() for record in caplog.records]
        assert any("store unreachable" in message for message in messages), messages
        assert any("store reachable again" in message for message in messages), messages
    finally:
        await proxy.close()
        await admin.close()
        await gateway.close()
