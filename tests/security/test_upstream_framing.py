"""Regression tests for the upstream client review: framing, desynchronisation, timers, resets, reloads.

Each test drives the real gateway (proxy listener in this process) in front of a hand-written
upstream on loopback, so what the upstream read off the wire and the exact bytes the client got
are both observed. Each bug the review reported (gateway/upstream.py before the fixes) has a
test here that fails on it: a body smuggled as a second request, a leftover response answering
the next request, a read timer outliving its exchange, no retry after a reset, hangs after 1xx
and on a stalled upload, waiters failed by a reload, and a 100 Continue sent before a 413. A few
cases the old code already got right (chunked smuggling attempts, a POST on a reset connection)
guard the fixes from overshooting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, get_port_socket

from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import proxy_test_server
from tests.integration.test_upstream_client import (
    POLICIES,
    Exchange,
    LoopbackUpstream,
    Proxy,
    RawUpstream,
    Responder,
    _parse_head,
    _read_body,
    ok,
    refusal,
    running,
    until,
    write_gateway_config,
)

TIMEOUT = 0.5  # the route timeout of the timing tests, seconds

# POLICIES plus a public rule on the echo route (no token needed for /echo/hook).
PUBLIC_POLICIES = POLICIES.replace(
    "  echo:\n    rules:\n",
    '  echo:\n    rules:\n      - paths: ["/echo/hook"]\n        public: true\n',
    1,
)
assert PUBLIC_POLICIES != POLICIES


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, respond: Responder, *, policies: str = POLICIES, **route_options: float | int | str
) -> AsyncIterator[tuple[RawUpstream, Proxy, Gateway]]:
    """`running` with chosen policies, also handing out the gateway (for reload)."""
    upstream = RawUpstream(respond)
    await upstream.start()
    config_path = write_gateway_config(tmp_path, upstream.port, **route_options)
    (tmp_path / "policies" / "policy.yaml").write_text(policies)
    gateway = await Gateway.open(load_config(config_path, env={}))
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        async with TestClient(proxy_test_server(gateway)) as client:
            yield upstream, Proxy(client, {"Authorization": f"Bearer {token}"}), gateway
    finally:
        await gateway.close()
        await upstream.stop()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """(head, body) of the next response on a raw connection; the body by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return head, body


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def error_code(body: bytes) -> str:
    code: str = json.loads(body)["error"]
    return code


async def report_body(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok(b"received %d" % len(exchange.body)))
    return True


# 1. Smuggling: a client naming Content-Length (or Transfer-Encoding) in Connection.

SMUGGLED = (
    b"GET /echo/smuggled HTTP/1.1\r\nHost: upstream\r\n"
    b"X-Service-User: root\r\nX-Service-User-Roles: *\r\n\r\n"
)


def chunked(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("framing", ["Content-Length", "Transfer-Encoding"])
@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("path", ["/echo/x", "/echo/hook"], ids=["authorised", "public"])
async def test_connection_naming_the_framing_header_cannot_smuggle_a_request(
    tmp_path: Path, framing: str, method: str, path: str
) -> None:
    async with serving(tmp_path, report_body, policies=PUBLIC_POLICIES, timeout=2) as (upstream, proxy, _):
        public = path == "/echo/hook"
        authorization = "" if public else f"Authorization: {proxy.headers['Authorization']}\r\n"
        if framing == "Content-Length":
            framed = f"Content-Length: {len(SMUGGLED)}\r\n".encode() + b"\r\n" + SMUGGLED
        else:
            framed = b"Transfer-Encoding: chunked\r\n\r\n" + chunked(SMUGGLED)
        raw = (
            f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n{authorization}Connection: {framing}\r\n".encode()
            + framed
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            writer.write(raw)
            await writer.drain()
            head, body = await read_response(reader)
        finally:
            writer.close()
        await asyncio.sleep(0.2)  # a smuggled second request would have been parsed by now
        # Exactly one request, carrying the whole body under framing the upstream reads as such.
        assert upstream.lines == [f"{method} {path} HTTP/1.1"]
        [exchange] = upstream.exchanges
        assert exchange.complete
        assert exchange.body == SMUGGLED
        lengths, encodings = exchange.values("Content-Length"), exchange.values("Transfer-Encoding")
        assert (lengths, encodings) in (([str(len(SMUGGLED))], []), ([], ["chunked"])), exchange.headers
        assert exchange.values("X-Service-User") == ([] if public else ["svc"])
        assert status_of(head) == 200, head
        assert body == b"received %d" % len(SMUGGLED)


# 2. A response longer than its Content-Length must not answer the next request.

POISON = b"HTTP/1.1 302 Found\r\nLocation: http://evil.invalid/\r\nX-Pad: "
COMMENT = b"a comment"


def miscounting(later: bool) -> Responder:
    """/echo/comment declares len(COMMENT) but sends COMMENT + the start of a 302 (now, or 0.1 s later)."""

    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        if exchange.target != "/echo/comment":
            writer.write(ok(b"hello"))
        elif later:
            writer.write(ok(COMMENT))
            asyncio.get_running_loop().call_later(0.1, writer.write, POISON)
        else:
            writer.write(ok(COMMENT) + POISON)
        return True

    return respond


@pytest.mark.parametrize("later", [False, True], ids=["same-segment", "while-idle"])
async def test_surplus_response_bytes_never_answer_the_next_request(tmp_path: Path, later: bool) -> None:
    async with running(tmp_path, miscounting(later)) as (upstream, proxy):
        first = await proxy.request("GET", "/echo/comment", allow_redirects=False)
        assert (first.status, await first.read()) == (200, COMMENT)
        await asyncio.sleep(0.3)
        second = await proxy.request("GET", "/echo/account", allow_redirects=False)
        body = await second.read()
        assert second.status != 302 and "Location" not in second.headers, (second.status, second.headers)
        if second.status == 200:
            assert body == b"hello"
        else:
            assert (second.status, json.loads(body)["error"]) == (502, "upstream_unavailable"), body


# 3. A read timer armed by a body writer that finished after the answer must die with the exchange.

BIG = b"b" * (512 * 1024)


class EarlyAnswerUpstream(LoopbackUpstream):
    """Answers /echo/early in full as soon as its head is in, and only then reads its body;
    any other request after reading its body ("received N")."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        number = self.connections
        try:
            while True:
                exchange = _parse_head(number, await reader.readuntil(b"\r\n\r\n"))
                self.exchanges.append(exchange)
                if exchange.target == "/echo/early":
                    writer.write(ok(BIG))  # not drained: the gateway takes it at its client's pace
                    await _read_body(reader, exchange)
                else:
                    await _read_body(reader, exchange)
                    writer.write(ok(b"received %d" % len(exchange.body)))
                exchange.complete = True
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            asyncio.CancelledError,
        ):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


def small_send_buffer(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """The proxy listener's socket, its connections' send buffer fixed small (accepted sockets inherit it):
    loopback autotuning would otherwise let a client that reads nothing absorb megabytes."""
    sock = get_port_socket(host, port, family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return sock


@contextlib.asynccontextmanager
async def early_answering(tmp_path: Path) -> AsyncIterator[tuple[EarlyAnswerUpstream, Proxy]]:
    """The gateway (timeout 0.5, small send buffers towards clients) in front of EarlyAnswerUpstream."""
    upstream = EarlyAnswerUpstream()
    await upstream.start()
    gateway = await Gateway.open(
        load_config(write_gateway_config(tmp_path, upstream.port, timeout=TIMEOUT), env={})
    )
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        server = proxy_test_server(gateway, socket_factory=small_send_buffer)
        async with TestClient(server) as client:
            yield upstream, Proxy(client, {"Authorization": f"Bearer {token}"})
    finally:
        await gateway.close()
        await upstream.stop()


async def post_early(proxy: Proxy, upstream: EarlyAnswerUpstream, read_after: float) -> tuple[bytes, bytes]:
    """POST /echo/early from a client that sends its 10-byte body only once the gateway holds the
    upstream's whole answer, and starts reading `read_after` s after that; (head, body as received)."""
    # A small receive window, and nothing read until the body is out: the gateway's relay of the
    # 512 KiB answer stalls, so the exchange is still open when its body writer finishes.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(
            # Chunked, so the gateway streams it (a small body of known length is read whole first).
            b"POST /echo/early HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n"
            + f"Authorization: {proxy.headers['Authorization']}\r\n\r\n".encode()
        )
        await writer.drain()
        await until(lambda: len(upstream.exchanges) == 1)
        await asyncio.sleep(0.3)  # the gateway has taken the whole answer from the upstream by now
        writer.write(b"a\r\n0123456789\r\n0\r\n\r\n")
        await writer.drain()
        await until(lambda: upstream.exchanges[0].complete)  # the gateway's body writer is done
        await asyncio.sleep(read_after)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = b""
        while len(body) < len(BIG):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break  # the gateway cut the answer short
            body += chunk
        return head, body
    finally:
        writer.close()


async def test_no_stale_read_timer_after_an_answer_that_came_before_the_body(tmp_path: Path) -> None:
    """timeout 0.5. POST /echo/early: the upstream sends its whole answer before reading the body,
    and the gateway's body writer finishes after that answer and before the exchange ends. The
    connection goes back to the pool; the next request on it is an upload of ~1.2 s with 0.1 s
    gaps, which must get 200 (the read timer that writer started, left running, made it a 504)."""
    async with early_answering(tmp_path) as (upstream, proxy):
        head, body = await post_early(proxy, upstream, read_after=0)
        assert status_of(head) == 200, head
        assert body == BIG

        async def slow_upload() -> AsyncIterator[bytes]:
            for _ in range(12):
                yield b"z" * 10
                await asyncio.sleep(0.1)

        started = time.monotonic()
        response = await proxy.request("POST", "/echo/upload", data=slow_upload())
        answer = await response.read()
        assert (response.status, answer) == (200, b"received 120"), (time.monotonic() - started, answer)
        # The upload really went on the pooled connection the first exchange left behind.
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 1]
        assert upstream.exchanges[1].body == b"z" * 120


async def test_finished_upload_does_not_time_out_the_relay_of_a_complete_answer(tmp_path: Path) -> None:
    """The same first exchange, with a client that starts reading 1 s (2 x timeout) after its
    body went out. The upstream sent its whole answer long before: no upstream silence is being
    timed, so the client must get all of it, not an answer cut off after the route timeout."""
    async with early_answering(tmp_path) as (upstream, proxy):
        head, body = await post_early(proxy, upstream, read_after=2 * TIMEOUT)
        assert status_of(head) == 200, head
        received = len(body)
        assert received == len(BIG), f"the answer was cut off after {received} of {len(BIG)} bytes"
        assert body == BIG


# 4. The keep-alive race: the upstream resets an idle pooled connection at the next request.


def resetting_second_request() -> Responder:
    """Answers the first request of each connection; resets (RST) at the second without answering."""
    served: dict[int, int] = {}

    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        served[exchange.connection] = served.get(exchange.connection, 0) + 1
        if served[exchange.connection] > 1:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        writer.write(ok(exchange.target.encode()))
        return True

    return respond


async def test_get_on_a_reset_pooled_connection_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    async with running(tmp_path, resetting_second_request()) as (upstream, proxy):
        first = await proxy.request("GET", "/echo/first")
        assert (first.status, await first.read()) == (200, b"/echo/first")
        again = await proxy.request("GET", "/echo/again")
        assert (again.status, await again.read()) == (200, b"/echo/again")
        assert upstream.lines == [
            "GET /echo/first HTTP/1.1",
            "GET /echo/again HTTP/1.1",
            "GET /echo/again HTTP/1.1",
        ]
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 1, 2]


async def test_post_on_a_reset_pooled_connection_is_502_and_not_replayed(tmp_path: Path) -> None:
    async with running(tmp_path, resetting_second_request()) as (upstream, proxy):
        first = await proxy.request("GET", "/echo/first")
        assert (first.status, await first.read()) == (200, b"/echo/first")
        post = await proxy.request("POST", "/echo/post", data=b"payload")
        status, code, _ = await refusal(post)
        assert (status, code) == (502, "upstream_unavailable")
        await asyncio.sleep(0.2)
        assert upstream.lines == ["GET /echo/first HTTP/1.1", "POST /echo/post HTTP/1.1"]
        assert upstream.exchanges[1].body == b"payload"
        assert upstream.connections == 1


# 5. 1xx: Early Hints then silence is bounded by the route timeout; an unasked 101 is a 502.

HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


async def interim_then(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    if exchange.target == "/echo/hints":
        writer.write(HINTS)
        await writer.drain()
        await asyncio.sleep(30)  # silence (the handler is cancelled when the test ends)
        return False
    if exchange.target == "/echo/upgrade":
        writer.write(SWITCH)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(ok(b"after the switch"))
        await writer.drain()
        await asyncio.sleep(30)
        return False
    writer.write(ok(b"fine"))
    return True


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_early_hints_then_silence_is_a_504_within_the_route_timeout(
    tmp_path: Path, method: str
) -> None:
    async with running(tmp_path, interim_then, timeout=TIMEOUT) as (upstream, proxy):
        started = time.monotonic()
        data = b"some body" if method == "POST" else None
        response = await proxy.request(method, "/echo/hints", data=data)
        elapsed = time.monotonic() - started
        status, code, _ = await refusal(response)
        assert (status, code) == (504, "upstream_timeout")
        assert TIMEOUT * 0.8 <= elapsed < 3 * TIMEOUT, elapsed
        after = await proxy.request("GET", "/echo/after")
        assert (after.status, await after.read()) == (200, b"fine")
        assert upstream.lines == [f"{method} /echo/hints HTTP/1.1", "GET /echo/after HTTP/1.1"]


async def test_unasked_switching_protocols_is_a_prompt_502(tmp_path: Path) -> None:
    async with running(tmp_path, interim_then, timeout=2) as (upstream, proxy):
        started = time.monotonic()
        response = await proxy.request("GET", "/echo/upgrade")
        elapsed = time.monotonic() - started
        status, code, _ = await refusal(response)
        assert (status, code) == (502, "upstream_unavailable")
        assert elapsed < 1.0, elapsed  # not the 2 s route timeout, nor a hang
        # That connection is no longer HTTP: the next request goes on a new one.
        after = await proxy.request("GET", "/echo/after")
        assert (after.status, await after.read()) == (200, b"fine")
        assert upstream.lines == ["GET /echo/upgrade HTTP/1.1", "GET /echo/after HTTP/1.1"]
        assert [exchange.connection for exchange in upstream.exchanges] == [1, 2]


# 6. An upstream that never reads a large request body.

LARGE = 16 * 1024 * 1024


async def test_upstream_never_reading_a_large_body_is_a_504_not_a_hang(tmp_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []
    handlers: list[asyncio.Task[None]] = []

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await asyncio.sleep(30)  # neither reads nor answers (cancelled at the end)

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = await Gateway.open(load_config(write_gateway_config(tmp_path, port, timeout=TIMEOUT), env={}))
    sender: asyncio.Task[None] | None = None
    try:
        await gateway.directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token("svc", "t", actor="test")
        async with TestClient(proxy_test_server(gateway)) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)

            async def send_body() -> None:
                piece = b"x" * 65536
                with contextlib.suppress(ConnectionError):
                    for _ in range(LARGE // len(piece)):
                        writer.write(piece)
                        await writer.drain()

            started = time.monotonic()
            writer.write(
                f"POST /echo/upload HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Length: {LARGE}\r\n\r\n".encode()
            )
            sender = asyncio.create_task(send_body())
            try:
                head, body = await read_response(reader, timeout=6 * TIMEOUT)
            finally:
                writer.close()
            elapsed = time.monotonic() - started
            assert (status_of(head), error_code(body)) == (504, "upstream_timeout"), (head, body)
            assert elapsed < 4 * TIMEOUT, elapsed
            assert len(accepted) == 1
    finally:
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await gateway.close()
        server.close()
        for held in accepted:
            held.transport.abort()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


# 7. A reload while a request waits for a pool slot.


async def slow_answer(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
    await asyncio.sleep(0.5)
    writer.write(ok(exchange.target.encode()))
    return True


async def test_reload_does_not_fail_requests_waiting_for_a_pool_slot(tmp_path: Path) -> None:
    async with serving(tmp_path, slow_answer, max_connections=1) as (upstream, proxy, gateway):
        holder = asyncio.create_task(proxy.request("GET", "/echo/holder"))
        await until(lambda: len(upstream.exchanges) == 1)
        waiter = asyncio.create_task(proxy.request("GET", "/echo/waiter"))
        await asyncio.sleep(0.1)  # the waiter is queued for the pool's one connection
        assert len(upstream.exchanges) == 1
        write_gateway_config(tmp_path, upstream.port, max_connections=2)
        assert gateway.reload()
        held, waited = await holder, await waiter
        assert (held.status, await held.read()) == (200, b"/echo/holder")
        assert (waited.status, await waited.read()) == (200, b"/echo/waiter")
        assert upstream.lines == ["GET /echo/holder HTTP/1.1", "GET /echo/waiter HTTP/1.1"]
        # The new pool (max_connections 2) serves as well.
        response = await proxy.request("GET", "/echo/new")
        assert (response.status, await response.read()) == (200, b"/echo/new")


# 8. Expect: 100-continue with a declared body over max_body.


async def test_expect_continue_over_max_body_is_413_without_100_continue(tmp_path: Path) -> None:
    async with running(tmp_path, report_body, max_body=1000) as (upstream, proxy):
        authorization = f"Authorization: {proxy.headers['Authorization']}\r\n"

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            writer.write(
                f"POST /echo/big HTTP/1.1\r\nHost: gw.test\r\n{authorization}"
                "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            await writer.drain()
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 413 "), head  # the very first bytes: no 100 Continue
            assert error_code(body) == "body_too_large"
            # Nothing follows (no late 100 Continue either).
            try:
                rest = await asyncio.wait_for(reader.read(65536), 0.3)
            except TimeoutError:
                rest = b""
            assert rest == b""
        finally:
            writer.close()
        assert upstream.exchanges == []

        # Within the limit the client is told to go on, and the body reaches the upstream.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            writer.write(
                f"POST /echo/small HTTP/1.1\r\nHost: gw.test\r\n{authorization}"
                "Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"s" * 1000)
            await writer.drain()
            head, body = await read_response(reader)
            assert (status_of(head), body) == (200, b"received 1000"), head
        finally:
            writer.close()
        assert upstream.lines == ["POST /echo/small HTTP/1.1"]
        assert upstream.exchanges[0].values("Expect") == []
