"""Request smuggling and malformed HTTP over a raw socket: 400, and nothing reaches the upstream."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import Harness
from tests.upstream import SEEN


async def exchange(port: int, raw: bytes, timeout: float = 3.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()
    return data


@pytest.mark.parametrize(
    "raw",
    [
        # Content-Length and Transfer-Encoding together.
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        # Two different Content-Lengths.
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\nabcd",
        # A bare CR inside a header value.
        b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Thing: a\rb\r\n\r\n",
        # Obsolete line folding.
        b"GET /echo/a HTTP/1.1\r\nHost: x\r\nX-Thing: a\r\n folded\r\n\r\n",
        # Transfer-Encoding that is not chunked last.
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        # A bad chunk size.
        b"POST /echo/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ],
)
async def test_smuggling_attempts_get_400_and_reach_nothing(harness: Harness, raw: bytes) -> None:
    token = await harness.token()
    raw = raw.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n", 1)
    seen: list[object] = harness.upstream_app[SEEN]
    before = len(seen)
    answer = await exchange(harness.client.port, raw)
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    await asyncio.sleep(0.1)
    assert len(seen) == before


async def test_parser_errors_never_log_the_token(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    token = await harness.token()
    raw = b"GET /echo/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() + b"\x01\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(harness.client.port, raw)
    assert answer.split(b" ", 2)[1] == b"400"
    assert token not in caplog.text
    for record in caplog.records:
        assert token not in record.getMessage()
        assert record.exc_info is None or token not in str(record.exc_info[1])
