"""Streaming both ways through a real `gateway serve` process; memory stays bounded."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import load_config
from gateway.services import Directory
from tests.conftest import Harness, proxy_test_server, write_config
from tests.process import GatewayProcess, serving

MB = 1024 * 1024


@pytest.fixture
async def served(tmp_path: Path, upstream: TestServer) -> AsyncIterator[tuple[GatewayProcess, str]]:
    """A gateway subprocess on a SQLite store, and a token with the writer role."""
    config_path = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )
    async with serving(config_path) as running:
        yield running


async def test_200mb_download_streams_with_bounded_rss(served: tuple[GatewayProcess, str]) -> None:
    process, token = served
    total = 200 * MB
    peak = 0
    received = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{process.proxy}/echo/big?bytes={total}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(MB):
                received += len(chunk)
                peak = max(peak, process.rss_bytes())
    assert received == total
    assert peak < 150 * MB, f"gateway RSS peaked at {peak / MB:.0f} MB"


async def test_100mb_upload_arrives_whole(served: tuple[GatewayProcess, str]) -> None:
    process, token = served
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256()
    for _ in range(100):
        expected.update(block)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield block

    async with aiohttp.ClientSession() as session:
        # Chunked (unknown length) and with Content-Length: both must arrive byte for byte.
        for headers in ({}, {"Content-Length": str(100 * MB)}):
            async with session.put(
                f"{process.proxy}/echo/upload",
                data=body(),
                headers={"Authorization": f"Bearer {token}", **headers},
            ) as response:
                assert response.status == 200
                echo = await response.json()
            assert echo["body_bytes"] == 100 * MB
            assert echo["body_sha256"] == expected.hexdigest()


def _chunks(count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield b"y" * 65536


async def test_body_over_max_body_is_refused(make_harness) -> None:  # type: ignore[no-untyped-def]
    harness: Harness = await make_harness(extra_yaml="limits:\n  max_body: 100000\n")
    token = await harness.token()
    headers = {"Authorization": f"Bearer {token}"}
    declared = await harness.client.post("/echo/a", data=b"z" * 200_000, headers=headers)
    assert declared.status == 413
    assert (await declared.json())["error"] == "body_too_large"

    async def unknown_length() -> AsyncIterator[bytes]:
        for chunk in _chunks(4):
            yield chunk

    chunked = await harness.client.post("/echo/a", data=unknown_length(), headers=headers)
    assert chunked.status == 413
    small = await harness.client.post("/echo/a", data=b"z" * 1000, headers=headers)
    assert small.status == 200


async def test_upstream_timeout_and_unavailable(make_harness) -> None:  # type: ignore[no-untyped-def]
    harness: Harness = await make_harness()
    token = await harness.token()
    headers = {"Authorization": f"Bearer {token}"}
    slow = await harness.client.get("/echo/a?delay=3", headers=headers)  # route timeout is 2 s
    assert slow.status == 504
    assert (await slow.json())["error"] == "upstream_timeout"
    # A stall between body chunks after headers: the response is cut, not hung.
    stalled = await harness.client.get("/echo/a?stall=3", headers=headers)
    assert stalled.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await stalled.read()


async def test_a_head_sent_before_its_body_reaches_the_client_at_once(make_harness) -> None:  # type: ignore[no-untyped-def]
    # The gateway writes a small answer's head together with its body, but only when the
    # body came with it: a head the upstream sends alone (a slow or long-polled answer) is
    # relayed without waiting for the body.
    harness: Harness = await make_harness()
    token = await harness.token()
    loop = asyncio.get_running_loop()
    sent = loop.time()
    held = await harness.client.get("/echo/a?hold=1.5", headers={"Authorization": f"Bearer {token}"})
    head_after = loop.time() - sent
    assert held.status == 200
    assert await held.read() == b"late"
    assert head_after < 1.0 <= loop.time() - sent


async def test_refused_upstream_is_502(tmp_path: Path, store_url: str) -> None:
    from tests.process import free_port

    config_path = write_config(tmp_path, store_url=store_url, upstream_url=f"http://127.0.0.1:{free_port()}")
    gateway = await Gateway.open(load_config(config_path, env={}))
    try:
        from aiohttp.test_utils import TestClient

        directory = Directory(gateway.store, lambda: gateway.pipeline.settings.table)
        await directory.create_user("u", actor="test", roles=["writer"])
        _, token = await directory.create_token("u", "t", actor="test")
        async with TestClient(proxy_test_server(gateway)) as client:
            response = await client.get("/echo/a", headers={"Authorization": f"Bearer {token}"})
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_unavailable"
    finally:
        await gateway.close()


async def test_expect_continue_only_after_authorisation(harness: Harness) -> None:
    token = await harness.token()
    for auth, expected in (
        (b"", b"HTTP/1.1 401"),
        (b"Authorization: Bearer " + token.encode() + b"\r\n", b"HTTP/1.1 100"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", harness.client.port)
        writer.write(
            b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            + auth
            + b"\r\n"
        )
        await writer.drain()
        first = await asyncio.wait_for(reader.readline(), 3)
        assert first.startswith(expected), first
        if expected == b"HTTP/1.1 100":
            assert await reader.readline() == b"\r\n"
            writer.write(b"hello")
            await writer.drain()
            rest = b""
            while b"body_bytes" not in rest:
                more = await asyncio.wait_for(reader.read(65536), 3)
                assert more, rest
                rest += more
            assert b"HTTP/1.1 200" in rest and b'"body_bytes": 5' in rest
            assert b"100-continue" not in rest.split(b"\r\n\r\n", 1)[1].lower()
        writer.close()


async def test_client_disconnect_mid_stream_is_quiet(harness: Harness) -> None:
    token = await harness.token()
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.client.port)
    writer.write(
        f"GET /echo/big?bytes={50 * MB} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readexactly(1024)
    writer.close()
    await asyncio.sleep(0.3)
    # The gateway keeps serving.
    response = await harness.client.get("/echo/a", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
