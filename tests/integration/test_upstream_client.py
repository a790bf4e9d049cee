"""gateway/upstream.py against a hand-written upstream: framing, 1xx, keep-alive, pool limits, failures.

The upstream is a raw `asyncio.start_server` on loopback that parses each request itself
(Content-Length or chunked, de-chunked) and answers with exact bytes chosen per test, so
what the gateway put on the wire, and how many connections it used, is observed directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientTimeout
from aiohttp.test_utils import TestClient

from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import proxy_test_server


@dataclass
class Exchange:
    """One request as the upstream read it off the wire."""

    connection: int  # 1-based number of the upstream connection it came on
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False  # head and whole body read

    def values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def line(self) -> str:
        return f"{self.method} {self.target} {self.version}"


Responder = Callable[[Exchange, asyncio.StreamWriter], Awaitable[bool]]


class LoopbackUpstream:
    """A raw upstream on 127.0.0.1: start/stop and the connection handlers to cancel at stop."""

    def __init__(self) -> None:
        self.connections = 0
        self.exchanges: list[Exchange] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawUpstream(LoopbackUpstream):
    """An HTTP/1.1 upstream answering with hand-written bytes; `respond` returns keep-alive or not."""

    def __init__(self, respond: Responder) -> None:
        super().__init__()
        self.respond = respond
        self.open_now = 0
        self.max_open = 0
        self.finished = 0  # connections whose handler has ended
        self.hang_up_on_accept = False  # reset the connection before reading a byte

    @property
    def lines(self) -> list[str]:
        return [exchange.line for exchange in self.exchanges]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while not self.hang_up_on_accept:
                head = await reader.readuntil(b"\r\n\r\n")
                exchange = _parse_head(number, head)
                self.exchanges.append(exchange)
                await _read_body(reader, exchange)
                exchange.complete = True
                keep = await self.respond(exchange, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # stop() ends handlers still holding an answer; nothing else cancels them
        finally:
            self.open_now -= 1
            self.finished += 1
            self._handlers.discard(task)
            if self.hang_up_on_accept:
                writer.transport.abort()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _parse_head(number: int, head: bytes) -> Exchange:
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return Exchange(number, method, target, version, headers)


async def _read_body(reader: asyncio.StreamReader, exchange: Exchange) -> None:
    """Read the body the head announces; `exchange.body` grows as it arrives (partial bodies show)."""
    encodings = ",".join(exchange.values("Transfer-Encoding")).lower()
    if "chunked" in encodings:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return
            exchange.body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise ConnectionError("bad chunk framing from the gateway")
    lengths = exchange.values("Content-Length")
    if lengths:
        exchange.body = await reader.readexactly(int(lengths[0]))


def ok(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    """A complete response with Content-Length."""
    head = "".join(f"{line}\r\n" for line in extra)
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


POLICIES = """\
roles:
  writer:
    permissions: ["echo:read", "echo:write"]
routes:
  echo:
    rules:
      - paths: ["/echo/**"]
        require: "echo:write"
  other:
    rules:
      - paths: ["/other/**"]
        require: "echo:write"
"""


def write_gateway_config(directory: Path, port: int, **echo_options: float | int | str) -> Path:
    """gateway.yaml (route echo → /echo, route other → /other, same upstream) and policies/.

    `limits="key: value"` sets one key of the top-level `limits` block instead of a route key.
    """
    limits = echo_options.pop("limits", None)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "policy.yaml").write_text(POLICIES)
    echo = {"timeout": 2, **echo_options}
    echo_lines = "".join(f"    {key}: {value}\n" for key, value in echo.items())
    other_lines = "".join(
        f"    {key}: {value}\n" for key, value in echo.items() if key in ("timeout", "max_connections")
    )
    config = directory / "gateway.yaml"
    config.write_text(
        "listeners:\n"
        '  proxy: "127.0.0.1:0"\n'
        '  admin: "127.0.0.1:0"\n'
        f'store:\n  url: "sqlite+aiosqlite:///{directory / "gw.db"}"\n'
        "routes:\n"
        f'  - name: echo\n    prefix: /echo\n    upstream: "http://127.0.0.1:{port}"\n{echo_lines}'
        f'  - name: other\n    prefix: /other\n    upstream: "http://127.0.0.1:{port}"\n{other_lines}'
        + (f"limits:\n  {limits}\n" if limits else "")
    )
    return config


@dataclass
class Proxy:
    """The running gateway's proxy listener and a token that may use every route."""

    client: TestClient
    headers: dict[str, str] = field(default_factory=dict)

    async def request(self, method: str, path: str, **kwargs: Any) -> ClientResponse:
        # Bounded, so a gateway that never answers fails the test instead of hanging it.
        kwargs.setdefault("timeout", ClientTimeout(total=5))
        return await self.client.request(method, path, headers=self.headers, **kwargs)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, respond: Responder, **echo_options: float | int | str
) -> AsyncIterator[tuple[RawUpstream, Proxy]]:
    """A raw upstream answering with `respond`, and the gateway in front of it."""
    upstream = RawUpstream(respond)
    await upstream.start()
    gateway = await Gateway.open(
        load_config(write_gateway_config(tmp_path, upstream.port, **echo_options), env={})
    )
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        async with TestClient(proxy_test_server(gateway)) as client:
            yield upstream, Proxy(client, {"Authorization": f"Bearer {token}"})
    finally:
        await gateway.close()
        await upstream.stop()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for `condition` (polled); fail the test when it does not hold within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


async def refusal(response: ClientResponse) -> tuple[int, str, str]:
    """(status, JSON error code, detail) of a gateway refusal."""
    body = await response.json()
    return response.status, body["error"], body["detail"]


# 1. HEAD and GET alternating on one keep-alive connection.

BODIES = {"/echo/a": b"alpha body!", "/echo/b": b"the bravo body, longer", "/echo/c": b"c"}


async def head_or_get(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    body = BODIES[exchange.target]
    answer = ok(body, "Content-Type: text/plain")
    # A HEAD answer announces the GET body's length and carries no body.
    writer.write(answer[: -len(body)] if exchange.method == "HEAD" else answer)
    return True


async def test_head_and_get_share_one_keepalive_connection(tmp_path: Path) -> None:
    sequence = [
        ("HEAD", "/echo/a"),
        ("GET", "/echo/a"),
        ("HEAD", "/echo/b"),
        ("GET", "/echo/b"),
        ("GET", "/echo/c"),
        ("HEAD", "/echo/c"),
        ("HEAD", "/echo/a"),
        ("GET", "/echo/b"),
    ]
    async with running(tmp_path, head_or_get) as (upstream, proxy):
        for method, path in sequence:
            response = await proxy.request(method, path)
            body = await response.read()
            assert response.status == 200, (method, path)
            assert response.headers["Content-Length"] == str(len(BODIES[path])), (method, path)
            assert response.headers["Content-Type"] == "text/plain"
            assert body == (b"" if method == "HEAD" else BODIES[path]), (method, path)
        assert upstream.lines == [f"{method} {path} HTTP/1.1" for method, path in sequence]
        assert upstream.connections == 1
        assert all(exchange.complete and exchange.body == b"" for exchange in upstream.exchanges)


# 2. 1xx interim responses are skipped.


async def early_hints(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = ok(f"final for {exchange.target}".encode(), "X-Final: yes", "Content-Type: text/plain")
    if exchange.target == "/echo/split":
        writer.write(hints)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(final)
    else:  # interim and final response in one segment
        writer.write(hints + b"HTTP/1.1 100 Continue\r\n\r\n" + final)
    return True


async def test_early_hints_are_skipped_and_the_final_response_relayed(tmp_path: Path) -> None:
    async with running(tmp_path, early_hints) as (upstream, proxy):
        for path in ("/echo/split", "/echo/together", "/echo/split"):
            response = await proxy.request("GET", path)
            assert response.status == 200, path
            assert response.headers["X-Final"] == "yes"
            assert response.headers["Content-Type"] == "text/plain"
            assert await response.read() == f"final for {path}".encode()
        # The interim responses did not desynchronise the keep-alive connection.
        assert upstream.connections == 1
        assert len(upstream.exchanges) == 3


# 3. A body delimited by the upstream closing the connection.

UNTIL_CLOSE = b"".join(b"line %05d of a body without a length\n" % i for i in range(5000))


async def close_delimited(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Framing: eof\r\n\r\n")
    for start in range(0, len(UNTIL_CLOSE), 40000):
        writer.write(UNTIL_CLOSE[start : start + 40000])
        await writer.drain()
        await asyncio.sleep(0.01)
    return False  # the end of the body is the end of the connection


async def test_body_ended_by_connection_close_reaches_client_whole(tmp_path: Path) -> None:
    async with running(tmp_path, close_delimited) as (upstream, proxy):
        for attempt in range(2):
            response = await proxy.request("GET", f"/echo/eof{attempt}")
            assert response.status == 200
            assert response.headers["X-Framing"] == "eof"
            assert await response.read() == UNTIL_CLOSE
        # A connection ended by the upstream is never reused.
        assert upstream.connections == 2


# 4. A chunked upstream response.

CHUNKS = [b"alpha-", b"b" * 70000, b"-gamma", b"\r\n0\r\n", b"end"]


async def chunked_answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-test\r\n\r\n")
    for chunk in CHUNKS:
        writer.write(b"%x;ext=1\r\n" % len(chunk) + chunk + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
    writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
    return True


async def test_chunked_response_relayed_intact(tmp_path: Path) -> None:
    async with running(tmp_path, chunked_answer) as (upstream, proxy):
        for path in ("/echo/one", "/echo/two"):
            response = await proxy.request("GET", path)
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-test"
            assert await response.read() == b"".join(CHUNKS)
        assert upstream.connections == 1  # the chunked framing ended cleanly: connection reused


UNSOLICITED = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def then_unsolicited_408(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok(exchange.target.encode()))
    if exchange.connection == 1:
        # What some servers send on an idle keep-alive connection before closing it.
        asyncio.get_running_loop().call_later(0.1, writer.write, UNSOLICITED)
    return True


async def test_unsolicited_response_on_idle_connection_is_not_taken_for_the_next(tmp_path: Path) -> None:
    async with running(tmp_path, then_unsolicited_408) as (upstream, proxy):
        first = await proxy.request("GET", "/echo/first")
        assert (first.status, await first.read()) == (200, b"/echo/first")
        await asyncio.sleep(0.3)  # the 408 is in the idle pooled connection by now
        second = await proxy.request("GET", "/echo/second")
        assert (second.status, await second.read()) == (200, b"/echo/second")
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 2]


# 5. A chunked request body: streamed chunked, and counted against max_body.


async def report_body(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok(b"received %d" % len(exchange.body)))
    return True


def body_parts(*parts: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def generate() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0.01)

    return generate


async def test_chunked_request_body_is_sent_chunked(tmp_path: Path) -> None:
    parts = (b"first part|", b"x" * 3000, b"|", bytes(range(256)))
    body = b"".join(parts)
    async with running(tmp_path, report_body, max_body=len(body)) as (upstream, proxy):
        response = await proxy.request("PUT", "/echo/upload", data=body_parts(*parts)())
        assert response.status == 200
        assert await response.read() == b"received %d" % len(body)
        [exchange] = upstream.exchanges
        assert exchange.line == "PUT /echo/upload HTTP/1.1"
        assert exchange.values("Transfer-Encoding") == ["chunked"]
        assert exchange.values("Content-Length") == []
        assert exchange.body == body  # exactly max_body bytes: allowed


async def test_chunked_request_body_over_max_body_is_refused(tmp_path: Path) -> None:
    async with running(tmp_path, report_body, max_body=1000) as (upstream, proxy):
        response = await proxy.request("POST", "/echo/upload", data=body_parts(b"a" * 600, b"b" * 600)())
        status, code, _ = await refusal(response)
        assert (status, code) == (413, "body_too_large")
        await until(lambda: upstream.finished == upstream.connections)
        # The upstream got the head and at most the part within the limit, never a whole request.
        assert [exchange.complete for exchange in upstream.exchanges] in ([], [False])
        assert all(len(exchange.body) <= 1000 for exchange in upstream.exchanges)
        # The gateway still serves the next request.
        response = await proxy.request("POST", "/echo/small", data=body_parts(b"ok")())
        assert response.status == 200
        assert await response.read() == b"received 2"


# 6. POST/PUT/PATCH without a body.


async def test_post_without_body_sends_content_length_zero(tmp_path: Path) -> None:
    async with running(tmp_path, report_body) as (upstream, proxy):
        # A raw client: aiohttp's would add its own Content-Length: 0 and hide the gateway's.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            for method in ("POST", "PUT", "PATCH"):
                writer.write(
                    f"{method} /echo/empty HTTP/1.1\r\nHost: gw.test\r\n"
                    f"Authorization: {proxy.headers['Authorization']}\r\n\r\n".encode()
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert await asyncio.wait_for(reader.readexactly(len(b"received 0")), 2) == b"received 0"
        finally:
            writer.close()
        assert [exchange.method for exchange in upstream.exchanges] == ["POST", "PUT", "PATCH"]
        for exchange in upstream.exchanges:
            assert exchange.values("Content-Length") == ["0"], exchange.method
            assert exchange.values("Transfer-Encoding") == [], exchange.method
            assert exchange.body == b""


# 7. max_connections: waiting for a pooled connection, bounded by the route's timeout.


async def slow_answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    await asyncio.sleep(0.5)
    writer.write(ok(exchange.target.encode()))
    return True


async def test_max_connections_makes_the_second_request_wait(tmp_path: Path) -> None:
    async with running(tmp_path, slow_answer, max_connections=1) as (upstream, proxy):
        started = time.monotonic()

        async def fetch(path: str) -> tuple[int, bytes, float]:
            response = await proxy.request("GET", path)
            return response.status, await response.read(), time.monotonic() - started

        first, second = await asyncio.gather(fetch("/echo/1"), fetch("/echo/2"))
        assert (first[0], first[1]) == (200, b"/echo/1")
        assert (second[0], second[1]) == (200, b"/echo/2")
        # One after the other on the one connection the pool may open.
        assert max(first[2], second[2]) >= 0.95
        assert upstream.connections == 1
        assert upstream.max_open == 1
        assert sorted(upstream.lines) == ["GET /echo/1 HTTP/1.1", "GET /echo/2 HTTP/1.1"]


async def first_connection_stalls(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    if exchange.connection == 1:
        await asyncio.sleep(2)
    writer.write(ok(exchange.target.encode()))
    return True


async def test_holder_times_out_and_frees_the_slot_for_the_waiter(tmp_path: Path) -> None:
    """timeout 0.3, max_connections 1, the first answer held 2 s.

    The holder's own read timeout (0.3 s after its request went out) fires before the
    waiter's pool deadline (0.3 s after it started waiting, 0.1 s later): the holder gets
    504 for the upstream's silence, its connection is dropped, and the waiter gets the
    freed slot, a new connection, and its answer.
    """
    async with running(tmp_path, first_connection_stalls, timeout=0.3, max_connections=1) as (
        upstream,
        proxy,
    ):
        holder = asyncio.create_task(proxy.request("GET", "/echo/holder"))
        await until(lambda: len(upstream.exchanges) == 1)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        waiter = await proxy.request("GET", "/echo/waiter")
        waited = time.monotonic() - started
        assert waiter.status == 200
        assert await waiter.read() == b"/echo/waiter"
        status, code, detail = await refusal(await holder)
        assert (status, code) == (504, "upstream_timeout")
        assert "max_connections" not in detail
        assert waited < 1.0
        assert upstream.lines == ["GET /echo/holder HTTP/1.1", "GET /echo/waiter HTTP/1.1"]
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 2]


async def slow_stream(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    # Busy for ~1 s, but never silent for longer than the route's 0.3 s timeout.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    for digit in b"0123456789":
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(bytes([digit]))
    return True


async def test_waiting_for_a_pooled_connection_is_bounded_by_the_route_timeout(tmp_path: Path) -> None:
    async with running(tmp_path, slow_stream, timeout=0.3, max_connections=1) as (upstream, proxy):
        holder = await proxy.request("GET", "/echo/holder")
        assert holder.status == 200  # headers are in; the body streams for ~1 s
        started = time.monotonic()
        waiter = await proxy.request("GET", "/echo/waiter")
        waited = time.monotonic() - started
        status, code, detail = await refusal(waiter)
        assert (status, code) == (504, "upstream_timeout")
        assert "max_connections: 1" in detail
        assert 0.25 <= waited < 0.9
        assert await holder.read() == b"0123456789"
        assert upstream.connections == 1
        assert upstream.lines == ["GET /echo/holder HTTP/1.1"]  # the waiter never reached it


async def test_routes_to_the_same_upstream_have_separate_pools(tmp_path: Path) -> None:
    """README: max_connections is the size of *this route's* pool; upstream.py: separate pools
    per route keep a route full of long downloads from starving the others."""
    async with running(tmp_path, slow_stream, timeout=0.3, max_connections=1) as (upstream, proxy):
        holder = await proxy.request("GET", "/echo/holder")
        assert holder.status == 200
        other = await proxy.request("GET", "/other/x")  # route `other`: same upstream, its own pool
        assert other.status == 200, await other.text()
        assert await other.read() == b"0123456789"
        assert await holder.read() == b"0123456789"
        assert upstream.connections == 2


# 8. Malformed upstream responses.

MALFORMED = {
    "/echo/status": b"HTTP/1.1 abc\r\n\r\n",
    "/echo/garbage": b"\x00\x01\x02 this is not HTTP at all\r\n\r\n",
    "/echo/length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nbody",
}


async def malformed(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    if exchange.target in MALFORMED:
        writer.write(MALFORMED[exchange.target])
        await writer.drain()
        await asyncio.sleep(0.2)  # keep the connection open: the gateway must not wait for it
        return False
    writer.write(ok(b"fine"))
    return True


async def test_malformed_response_is_502_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    async with running(tmp_path, malformed) as (upstream, proxy):
        assert (await proxy.request("GET", "/echo/ok")).status == 200  # a pooled connection first
        for path in MALFORMED:
            started = time.monotonic()
            response = await proxy.request("GET", path)
            status, code, _ = await refusal(response)
            assert (status, code) == (502, "upstream_unavailable"), path
            assert time.monotonic() - started < 1.0, path
            ok_response = await proxy.request("GET", "/echo/ok")
            assert ok_response.status == 200, path
            assert await ok_response.read() == b"fine"
        # A malformed answer is not a dropped connection: never retried.
        for path in MALFORMED:
            assert upstream.lines.count(f"GET {path} HTTP/1.1") == 1, path


# 9. An upstream that closes without answering.


async def hang_up(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    return False


async def test_upstream_closing_without_answer_is_502(tmp_path: Path) -> None:
    async with running(tmp_path, hang_up) as (upstream, proxy):
        response = await proxy.request("POST", "/echo/post", data=b"payload")
        status, code, _ = await refusal(response)
        assert (status, code) == (502, "upstream_unavailable")
        assert upstream.connections == 1  # a POST is never replayed
        assert upstream.exchanges[0].body == b"payload"

        started = time.monotonic()
        response = await proxy.request("GET", "/echo/get")
        status, code, _ = await refusal(response)
        assert (status, code) == (502, "upstream_unavailable")
        assert time.monotonic() - started < 1.0
        # The GET went out on a fresh connection: its failure is the upstream's answer, no retry.
        assert upstream.connections == 2
        assert upstream.lines == ["POST /echo/post HTTP/1.1", "GET /echo/get HTTP/1.1"]


async def answer_first_only(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    if exchange.connection == 1 and exchange.target == "/echo/first":
        writer.write(ok(b"first"))
        return True
    return False


async def test_retry_of_a_dropped_pooled_connection_happens_once(tmp_path: Path) -> None:
    async with running(tmp_path, answer_first_only) as (upstream, proxy):
        response = await proxy.request("GET", "/echo/first")
        assert response.status == 200 and await response.read() == b"first"
        started = time.monotonic()
        response = await proxy.request("GET", "/echo/again")
        status, code, _ = await refusal(response)
        assert (status, code) == (502, "upstream_unavailable")
        assert time.monotonic() - started < 1.0
        # The pooled connection dropped it, the one retry on a fresh connection too, then 502.
        assert upstream.lines == [
            "GET /echo/first HTTP/1.1",
            "GET /echo/again HTTP/1.1",
            "GET /echo/again HTTP/1.1",
        ]
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 1, 2]
        assert upstream.connections == 2


async def test_upstream_resetting_at_accept_is_502(tmp_path: Path) -> None:
    async with running(tmp_path, hang_up) as (upstream, proxy):
        upstream.hang_up_on_accept = True
        started = time.monotonic()
        for method in ("GET", "POST"):
            response = await proxy.request(method, "/echo/x")
            status, code, _ = await refusal(response)
            assert (status, code) == (502, "upstream_unavailable"), method
        assert time.monotonic() - started < 2.0
        assert upstream.connections == 2  # a fresh connection each, not retried
        assert upstream.exchanges == []


# Reload: a route whose upstream pool changed lets go of its old connections.


async def keep_alive_ok(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok(b"fine"))
    return True


async def test_reload_closes_the_pools_of_changed_routes(tmp_path: Path) -> None:
    upstream = RawUpstream(keep_alive_ok)
    await upstream.start()
    config_path = write_gateway_config(tmp_path, upstream.port)
    gateway = await Gateway.open(load_config(config_path, env={}))
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        async with TestClient(proxy_test_server(gateway)) as client:
            proxy = Proxy(client, {"Authorization": f"Bearer {token}"})
            for path in ("/echo/a", "/other/a"):
                response = await proxy.request("GET", path)
                assert (response.status, await response.read()) == (200, b"fine")
            await until(lambda: upstream.open_now == 2)  # one pooled connection per route
            # An unchanged reload keeps the pools and their connections.
            assert gateway.reload()
            await asyncio.sleep(0.2)
            assert (upstream.open_now, upstream.finished) == (2, 0)
            # Both routes' pool size changed: their old connections are closed.
            write_gateway_config(tmp_path, upstream.port, max_connections=7)
            assert gateway.reload()
            await until(lambda: upstream.open_now == 0 and upstream.finished == 2)
            response = await proxy.request("GET", "/echo/b")
            assert (response.status, await response.read()) == (200, b"fine")
            assert upstream.connections == 3
    finally:
        await gateway.close()
        await upstream.stop()
