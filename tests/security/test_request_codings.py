"""Request bodies reach the upstream exactly as framed: no content-coding is ever decoded.

Regression tests for the smuggling hole of the hardening review: the proxy listener used to
inflate gzip/deflate request bodies while forwarding the client's compressed Content-Length,
so the inflated tail was parsed by the upstream as a second request with forged identity
headers. Each test drives the real gateway in front of a raw upstream that does not inflate
request bodies, and checks what it read off the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib
from pathlib import Path

import pytest

from tests.security.test_upstream_framing import (
    PUBLIC_POLICIES,
    SMUGGLED,
    error_code,
    read_response,
    report_body,
    serving,
    status_of,
)


def compressed_with_smuggled_tail(coding: str) -> bytes:
    """A body whose inflated form is a decoy prefix followed by a whole second request."""
    inflated = b"x" * 64 + SMUGGLED
    return gzip.compress(inflated) if coding == "gzip" else zlib.compress(inflated)


async def raw_exchange(port: int, raw: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", ["/echo/x", "/echo/hook"], ids=["authorised", "public"])
async def test_compressed_body_is_forwarded_compressed_and_smuggles_nothing(
    tmp_path: Path, coding: str, path: str
) -> None:
    async with serving(tmp_path, report_body, policies=PUBLIC_POLICIES, timeout=2) as (upstream, proxy, _):
        body = compressed_with_smuggled_tail(coding)
        authorization = "" if path == "/echo/hook" else f"Authorization: {proxy.headers['Authorization']}\r\n"
        raw = (
            f"POST {path} HTTP/1.1\r\nHost: gw.test\r\n{authorization}"
            f"Content-Encoding: {coding}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        head, answer = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 200, head
        await asyncio.sleep(0.2)  # a smuggled second request would have been parsed by now
        assert upstream.lines == [f"POST {path} HTTP/1.1"]
        [exchange] = upstream.exchanges
        assert exchange.body == body  # the bytes the client sent, still compressed
        assert exchange.values("Content-Encoding") == [coding]
        assert exchange.values("Content-Length") == [str(len(body))]
        assert answer == b"received %d" % len(body)


async def test_max_body_counts_the_bytes_on_the_wire(tmp_path: Path) -> None:
    """A small gzip body that inflates far past max_body is judged by its compressed size."""
    inflated = b"a" * 950_000
    body = gzip.compress(inflated)
    assert len(body) < 1000 < len(inflated)
    async with serving(tmp_path, report_body, timeout=2, max_body=1000) as (upstream, proxy, _):
        raw = (
            f"POST /echo/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: {proxy.headers['Authorization']}\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        head, answer = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 200, head
        [exchange] = upstream.exchanges
        assert len(exchange.body) == len(body)
        # And a compressed body over the limit is refused by its own size.
        big = gzip.compress(os.urandom(2000))
        assert len(big) > 1000
        raw = (
            f"POST /echo/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: {proxy.headers['Authorization']}\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(big)}\r\n\r\n"
        ).encode() + big
        head, answer = await raw_exchange(proxy.client.port, raw)
        assert (status_of(head), error_code(answer)) == (413, "body_too_large")


@pytest.mark.parametrize(
    "coding",
    ["gzip, chunked", "deflate,chunked", "identity, chunked", "chunked, chunked", "x-custom, chunked"],
)
async def test_transfer_codings_other_than_chunked_are_refused(tmp_path: Path, coding: str) -> None:
    async with serving(tmp_path, report_body, policies=PUBLIC_POLICIES, timeout=2) as (upstream, proxy, _):
        payload = gzip.compress(b"x" * 64 + SMUGGLED)
        chunk = b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
        raw = (
            f"POST /echo/hook HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: {coding}\r\n\r\n".encode()
            + chunk
        )
        head, answer = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 400, head
        if answer:  # the parser itself may refuse some spellings with a bare 400
            assert error_code(answer) == "bad_request"
        await asyncio.sleep(0.1)
        assert upstream.exchanges == []
