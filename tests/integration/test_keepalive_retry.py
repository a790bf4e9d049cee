"""A pooled keep-alive connection the upstream closed: idempotent requests are retried once, fresh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import proxy_test_server, write_config

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class ForgetfulUpstream:
    """Answers the first request of each connection, then drops the connection at the second
    request without answering: what a keep-alive timeout racing a new request looks like."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            if length:
                await reader.readexactly(length)
            writer.write(ANSWER)
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the second request: never answered
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
async def forgetful() -> AsyncIterator[tuple[ForgetfulUpstream, int]]:
    upstream = ForgetfulUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    yield upstream, server.sockets[0].getsockname()[1]
    server.close()


async def test_idempotent_request_retried_on_fresh_connection(
    tmp_path: Path, forgetful: tuple[ForgetfulUpstream, int]
) -> None:
    upstream, port = forgetful
    path = write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}",
        upstream_url=f"http://127.0.0.1:{port}",
    )
    gateway = await Gateway.open(load_config(path, env={}))
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        headers = {"Authorization": f"Bearer {token}"}
        async with TestClient(proxy_test_server(gateway)) as client:
            first = await client.get("/echo/a", headers=headers)
            assert first.status == 200 and await first.text() == "ok"
            # The pooled connection is dropped at this request: retried once, on a new connection.
            second = await client.get("/echo/a", headers=headers)
            assert second.status == 200 and await second.text() == "ok"
            assert upstream.connections == 2
            # A POST is not idempotent: never replayed, the client learns it failed.
            post = await client.post("/echo/a", headers=headers, data=b"x")
            assert post.status == 502
            assert (await post.json())["error"] == "upstream_unavailable"
    finally:
        await gateway.close()
