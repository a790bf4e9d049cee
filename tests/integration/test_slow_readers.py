"""Clients that never read their answers, against a real `gateway serve` process.

The review's case: 100 clients that never read a 50 MB download held the route's upstream
pool and grew the gateway's RSS by 138 MB. Now each such connection buffers a bounded amount
(README "Slow clients") and is cut after `limits.send_timeout`, giving its upstream
connection back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import eventually, write_config
from tests.process import GatewayProcess, serving

MB = 1024 * 1024
CLIENTS = 60
SEND_TIMEOUT = 1.0
# What one stalled download may hold in the gateway: the upstream parser's buffer (about
# 2 x 64 KiB plus one socket read) and one relayed chunk (64 KiB) in the client transport
# above its high-water mark, with room for allocator slack. Measured: 24 MB for 60 clients
# (40 of them holding an upstream connection); before the bound, 64 MB.
PER_CONNECTION = 640 * 1024


@pytest.fixture
async def served(tmp_path: Path, upstream: TestServer) -> AsyncIterator[tuple[GatewayProcess, str]]:
    config_path = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        route_options="max_connections: 40\n",
        extra_yaml=f"limits:\n  send_timeout: {SEND_TIMEOUT}\n",
    )
    async with serving(config_path) as running:
        yield running


async def test_clients_that_never_read_hold_bounded_memory_and_free_the_pool(
    served: tuple[GatewayProcess, str],
) -> None:
    process, token = served
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # warm up: the RSS baseline includes a served request or two
            async with session.get(process.proxy + "/echo/a", headers=headers) as response:
                await response.read()
    baseline = process.rss_bytes()
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(CLIENTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", process.proxy_port, limit=1024)
            writer.write(
                f"GET /echo/big?bytes={50 * MB} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            stalled.append((reader, writer))
        await asyncio.sleep(0.5)  # the downloads have filled every buffer on the way by now
        grown = process.rss_bytes() - baseline
        assert grown < CLIENTS * PER_CONNECTION, f"RSS grew {grown / MB:.0f} MB for {CLIENTS} stalled clients"
        # 40 upstream connections are held by stalled clients, 20 wait for one; after the send
        # timeout every stalled client is cut, so a new request gets an upstream connection.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def served_now() -> bool:
                async with session.get(process.proxy + "/echo/a", headers=headers) as response:
                    await response.read()
                    return response.status == 200

            await eventually(served_now, within=3 * SEND_TIMEOUT + 5)
    finally:
        for _, writer in stalled:
            writer.close()
    await asyncio.sleep(1.5)  # the request log is flushed every second
    assert '"error":"send_timeout"' in process.logs()  # each cut is named in its log line
    assert process.rss_bytes() - baseline < CLIENTS * PER_CONNECTION
