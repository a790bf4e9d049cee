"""WebSocket through a real `gateway serve` process (README "WebSocket"): handshakes decided like
any GET, the `bearer.<credential>` subprotocol, the checked 101, message relay, close codes,
the 4 MiB limit, back-pressure, the access line and the `gateway_websockets_open` gauge.

The upstreams run on loopback in a thread of their own, so one gateway process serves the
whole module (the back-pressure test starts a fresh one: its RSS baseline must not include
what earlier tests allocated):

- a real WebSocket upstream (aiohttp) that sends what it received in the handshake as its
  first message, echoes text and binary, and obeys `cmd:` text messages; a request that is
  not a WebSocket handshake gets the headers it received back as JSON;
- a raw one that writes its answers byte by byte (a 403, a 101 with a wrong
  `Sec-WebSocket-Accept`, a 101 choosing a subprotocol nobody offered) and records every
  byte it receives afterwards;
- the ordinary JSON echo upstream (tests/upstream.py) behind a route without `websocket: true`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import DEFAULT_POLICIES
from tests.process import GatewayProcess
from tests.upstream import build_upstream

MiB = 1024 * 1024
LIMIT = 4 * MiB  # README "WebSocket": messages are limited to 4 MiB (close 1009)
PROTOCOLS = ("chat", "superchat")  # what the WebSocket upstream speaks
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
T = TypeVar("T")

POLICIES = DEFAULT_POLICIES + textwrap.indent(
    textwrap.dedent(
        """
        raw:
          rules:
            - methods: [GET]
              paths: ["/raw/**"]
              require: "echo:read"
        """
    ),
    "  ",
)


def accept_for(key: str) -> str:
    """RFC 6455 section 4.2.2, computed here independently of the gateway."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID, usedforsecurity=False).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def pattern(index: int, size: int) -> bytes:
    """Message `index` of the back-pressure stream: its number, then one repeated byte."""
    return index.to_bytes(4, "big") + bytes([index % 256]) * (size - 4)


# --------------------------------------------------------------------------- upstreams


@dataclass
class RawConnection:
    """One connection to the raw upstream: every byte it received."""

    received: bytearray = field(default_factory=bytearray)


@dataclass
class RawExchange:
    """One request the raw upstream answered: its head, and its connection from then on."""

    head: bytes
    connection: RawConnection
    offset: int  # len(connection.received) when the head was whole

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode()

    @property
    def after(self) -> bytes:
        """What the connection received after this request's head (all of it, whatever it is)."""
        return bytes(self.connection.received[self.offset :])


class Upstreams:
    """The test upstreams, on an event loop in a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ws-upstreams", daemon=True)
        self._runners: list[web.AppRunner] = []
        self._raw_server: asyncio.Server | None = None
        self._raw_writers: set[asyncio.StreamWriter] = set()
        self.opened: dict[str, dict[str, Any]] = {}  # ?id= → what the handshake carried
        self.closes: dict[str, tuple[WSMsgType, int | None, str]] = {}  # ?id= → how the socket ended
        self.raw: list[RawExchange] = []
        self.ws_url = self.echo_url = self.raw_url = ""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._stop(), timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._websocket)
        self.ws_url = await self._serve(app)
        self.echo_url = await self._serve(build_upstream())
        self._raw_server = await asyncio.start_server(self._raw, "127.0.0.1", 0)
        self.raw_url = f"http://127.0.0.1:{self._raw_server.sockets[0].getsockname()[1]}"

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def _stop(self) -> None:
        for writer in list(self._raw_writers):
            writer.close()
        if self._raw_server is not None:
            self._raw_server.close()
        for runner in self._runners:
            await runner.cleanup()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        received = [[name, value] for name, value in request.headers.items()]
        ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=0)
        if not ws.can_prepare(request).ok:
            return web.json_response({"websocket": False, "headers": received})
        await ws.prepare(request)
        conn = request.query.get("id", "")
        hello = {"path": request.path_qs, "headers": received, "protocol": ws.ws_protocol}
        self.opened[conn] = hello
        await ws.send_str(json.dumps(hello))
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                if message.data.startswith("cmd:"):
                    command, _, argument = message.data[4:].partition(":")
                    if command == "close":
                        code, _, reason = argument.partition(":")
                        await ws.close(code=int(code), message=reason.encode())
                        self.closes[conn] = (WSMsgType.CLOSE, int(code), reason)
                        break
                    if command == "stream":
                        count, _, size = argument.partition(":")
                        for index in range(int(count)):
                            await ws.send_bytes(pattern(index, int(size)))
                    elif command == "big":
                        await ws.send_bytes(b"u" * int(argument))
                else:
                    await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            else:  # CLOSE (aiohttp has answered it), CLOSING, CLOSED, ERROR
                code = message.data if message.type is WSMsgType.CLOSE else ws.close_code
                self.closes[conn] = (message.type, code, message.extra or "")
                break
        return ws

    async def _raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers each request head by its path; keeps the connection (and records every byte)."""
        connection = RawConnection()
        self._raw_writers.add(writer)
        pending = bytearray()
        try:
            while True:
                while b"\r\n\r\n" not in pending:
                    data = await reader.read(65536)
                    if not data:
                        return
                    connection.received += data
                    pending += data
                head, _, rest = bytes(pending).partition(b"\r\n\r\n")
                pending = bytearray(rest)
                exchange = RawExchange(head + b"\r\n\r\n", connection, len(connection.received) - len(rest))
                self.raw.append(exchange)
                writer.write(self._raw_answer(exchange))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._raw_writers.discard(writer)
            writer.close()

    @staticmethod
    def _raw_answer(exchange: RawExchange) -> bytes:
        key = ""
        for line in exchange.head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        path = exchange.path
        switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        if path.startswith("/raw/refuse"):
            body = json.dumps({"error": "not_today", "detail": "the upstream says no"}).encode()
            return (
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                b"X-Upstream: raw\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        if path.startswith("/raw/wrong-accept"):
            # A frame right behind the 101: it must never reach the client.
            return (
                switching + b"Sec-WebSocket-Accept: %s\r\n\r\n\x81\x04leak" % accept_for(new_key()).encode()
            )
        if path.startswith("/raw/unoffered"):
            return (
                switching
                + b"Sec-WebSocket-Accept: %s\r\n" % accept_for(key).encode()
                + b"Sec-WebSocket-Protocol: unoffered\r\n\r\n\x81\x04leak"
            )
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


# --------------------------------------------------------------------------- the gateway


def write_ws_config(directory: Path, upstreams: Upstreams) -> Path:
    """routes: echo and deep (WebSocket upstream, `websocket: true`; deep has a rate limit), strip
    (JSON echo upstream, no `websocket`), browser (cors, `websocket: true`), raw (the raw upstream,
    `websocket: true`)."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "policy.yaml").write_text(textwrap.dedent(POLICIES))
    config = directory / "gateway.yaml"
    ws, echo, raw = upstreams.ws_url, upstreams.echo_url, upstreams.raw_url
    config.write_text(
        "listeners:\n"
        '  proxy: "127.0.0.1:0"\n'
        '  admin: "127.0.0.1:0"\n'
        f'store:\n  url: "sqlite+aiosqlite:///{directory / "gateway.db"}"\n'
        "routes:\n"
        f'  - name: echo\n    prefix: /echo\n    upstream: "{ws}"\n    timeout: 2\n    websocket: true\n'
        f'  - name: deep\n    prefix: /echo/deep\n    upstream: "{ws}"\n    websocket: true\n'
        "    rate_limit: {rate: 1000, per: 1s}\n"
        f'  - name: strip\n    prefix: /strip\n    upstream: "{echo}"\n    strip_prefix: true\n'
        f'  - name: browser\n    prefix: /app\n    upstream: "{ws}"\n    websocket: true\n'
        "    cors:\n"
        '      origins: {store: true, extra: ["http://fixed.example:8000"]}\n'
        "      allow_headers: [Authorization, Content-Type]\n"
        "      expose_headers: [X-Request-Id]\n"
        "      max_age: 600\n"
        f'  - name: raw\n    prefix: /raw\n    upstream: "{raw}"\n    timeout: 2\n    websocket: true\n'
    )
    return config


async def create_users(config: Path) -> dict[str, str]:
    """A writer (`svc`) and a user whose only role is `other` (no echo:read): their token secrets."""
    gateway = await Gateway.open(load_config(config, env={}))
    try:
        tokens = {}
        for user, role in (("svc", "writer"), ("outsider", "other")):
            await gateway.directory.create_user(user, actor="test", roles=[role])
            _, tokens[user] = await gateway.directory.create_token(user, "t", actor="test")
        return tokens
    finally:
        await gateway.close()


@dataclass
class Env:
    upstreams: Upstreams
    config: Path
    process: GatewayProcess
    token: str  # svc, role writer
    outsider: str  # role other only

    def url(self, path: str, process: GatewayProcess | None = None) -> str:
        return (process or self.process).proxy.replace("http://", "ws://") + path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    upstreams = Upstreams()
    upstreams.start()
    try:
        config = write_ws_config(tmp_path_factory.mktemp("websocket"), upstreams)
        tokens = upstreams.run(create_users(config))
        process = GatewayProcess(config)
        try:
            upstreams.run(process.wait_ready())
            yield Env(upstreams, config, process, tokens["svc"], tokens["outsider"])
        finally:
            process.stop()
    finally:
        upstreams.stop()


# --------------------------------------------------------------------------- clients


@dataclass
class Seen:
    """What the aiohttp client sent in its handshake and what the 101 carried."""

    request: CIMultiDict[str] = field(default_factory=CIMultiDict)
    response: CIMultiDictProxy[str] | None = None


@dataclass
class Connected:
    ws: aiohttp.ClientWebSocketResponse
    hello: dict[str, Any]  # what the upstream received in its handshake
    seen: Seen


@contextlib.asynccontextmanager
async def websocket(url: str, **options: Any) -> AsyncIterator[Connected]:
    """An aiohttp WebSocket client through the gateway, past the upstream's first message."""
    seen = Seen()
    trace = aiohttp.TraceConfig()

    async def sent(_: Any, __: Any, params: aiohttp.TraceRequestHeadersSentParams) -> None:
        seen.request = CIMultiDict(params.headers)

    async def ended(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.response = params.response.headers

    trace.on_request_headers_sent.append(sent)
    trace.on_request_end.append(ended)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        async with session.ws_connect(url, max_msg_size=0, **options) as ws:
            hello = json.loads(await ws.receive_str(timeout=5))
            yield Connected(ws, hello, seen)


def values(received: list[list[str]], name: str) -> list[str]:
    """Every value of header `name` in a [name, value] list (case-insensitive)."""
    return [value for key, value in received if key.lower() == name.lower()]


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response head and its body (nothing after a 101)."""
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        if status == 101:
            return Answer(status, headers, b"")
        if "Content-Length" in headers:
            return Answer(status, headers, await reader.readexactly(int(headers["Content-Length"])))
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
            return Answer(status, headers, bytes(body))
        return Answer(status, headers, await reader.read())


def handshake_headers(
    *, token: str | None = None, key: str | None = None, connection: str = "Upgrade", **extra: str
) -> list[tuple[str, str]]:
    """A valid handshake's headers (`Authorization` when `token`); `extra` adds or replaces
    (underscores read as dashes; a value of "" leaves the header out)."""
    headers = {
        "Upgrade": "websocket",
        "Connection": connection,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key or new_key(),
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return [(name, value) for name, value in headers.items() if value]


@contextlib.asynccontextmanager
async def raw_connection(env: Env) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", env.process.proxy_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request_bytes(path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def handshake(env: Env, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> Answer:
    """Send one handshake byte for byte on a new connection; its answer."""
    async with raw_connection(env) as (reader, writer):
        writer.write(request_bytes(path, headers, body))
        return await read_answer(reader)


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (masked, FIN set, payload under 126 bytes)."""
    mask = os.urandom(4)
    return (
        bytes([0x80 | opcode, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A server frame (unmasked): (opcode, payload)."""
    async with asyncio.timeout(5):
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        return first & 0x0F, await reader.readexactly(length)


async def access_line(process: GatewayProcess, request_id: str, within: float = 5.0) -> dict[str, Any]:
    """The access-log line of `request_id` (the log is flushed about every second)."""
    deadline = time.monotonic() + within
    while True:
        for line in process.logs().splitlines():
            if request_id in line and line.startswith("{"):
                record = json.loads(line)
                if record.get("message") == "request" and record.get("request_id") == request_id:
                    return record
        if time.monotonic() > deadline:
            pytest.fail(f"no access line for request {request_id} within {within:g}s")
        await asyncio.sleep(0.1)


def rid(name: str) -> str:
    """A fresh request id (sent as X-Request-Id) and upstream connection id (sent as ?id=)."""
    return f"{name}-{os.urandom(4).hex()}"


async def wait_for(check: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {within:g}s")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- 1, 2: relay


async def test_messages_round_trip_and_the_bearer_entry_goes_nowhere(env: Env) -> None:
    conn = rid("bearer")
    offered = ("chat", f"bearer.{env.token}", "superchat")
    async with websocket(
        env.url(f"/echo/ws?id={conn}"), protocols=offered, headers={"X-Request-Id": conn}, compress=15
    ) as connected:
        ws, hello, seen = connected.ws, connected.hello, connected.seen
        await ws.send_str("hello, upstream")
        assert await ws.receive_str(timeout=5) == "hello, upstream"
        await ws.send_bytes(b"\x00\x01binary\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01binary\xff"
        await ws.send_str("ünïcødé ✓")
        assert await ws.receive_str(timeout=5) == "ünïcødé ✓"

        received = hello["headers"]
        assert values(received, "X-Service-User") == ["svc"]
        assert values(received, "Authorization") == []
        for name, value in received:
            assert env.token not in value, f"{name} carries the credential"
            assert "bearer." not in value.lower(), f"{name} carries a bearer entry"
        assert values(received, "Sec-WebSocket-Protocol") == ["chat, superchat"]
        client_key = seen.request["Sec-WebSocket-Key"]
        upstream_keys = values(received, "Sec-WebSocket-Key")
        assert len(upstream_keys) == 1 and upstream_keys[0] != client_key
        assert len(base64.b64decode(upstream_keys[0], validate=True)) == 16
        assert "permessage-deflate" in seen.request.get("Sec-WebSocket-Extensions", "")  # offered…
        assert values(received, "Sec-WebSocket-Extensions") == []  # …but never forwarded
        assert values(received, "Sec-WebSocket-Version") == ["13"]
        assert hello["protocol"] == "chat"

        assert ws.protocol == "chat"
        assert ws.compress == 0
        assert seen.response is not None
        assert seen.response.getall("Sec-WebSocket-Protocol") == ["chat"]
        assert seen.response["Sec-WebSocket-Accept"] == accept_for(client_key)
        assert seen.response["X-Request-Id"] == conn
        assert "Sec-WebSocket-Extensions" not in seen.response
        for name, value in seen.response.items():
            assert "bearer." not in value.lower() and env.token not in value, f"the 101 echoes it in {name}"
    line = await access_line(env.process, conn)
    assert line["status"] == 101 and line["user"] == "svc" and line["route"] == "echo"
    assert env.token not in env.process.logs()


async def test_the_authorization_header_works_too(env: Env) -> None:
    conn = rid("authorization")
    async with websocket(
        env.url(f"/echo/ws?id={conn}"), headers={"Authorization": f"Bearer {env.token}"}
    ) as connected:
        ws, hello = connected.ws, connected.hello
        await ws.send_str("plain")
        assert await ws.receive_str(timeout=5) == "plain"
        assert ws.protocol is None
        assert connected.seen.response is not None
        assert "Sec-WebSocket-Protocol" not in connected.seen.response
        received = hello["headers"]
        assert values(received, "X-Service-User") == ["svc"]
        assert values(received, "X-Service-User-Roles") == ["writer"]
        assert values(received, "Authorization") == []
        assert values(received, "Sec-WebSocket-Protocol") == []
        assert hello["protocol"] is None
        assert all(env.token not in value for _, value in received)


async def test_the_101_carries_the_rate_limit_headers(env: Env) -> None:
    async with websocket(
        # deep requires other:read: the outsider's
        env.url(f"/echo/deep/ws?id={rid('rate')}"),
        headers={"Authorization": f"Bearer {env.outsider}"},
    ) as connected:
        answer = connected.seen.response
        assert answer is not None
        assert answer.getall("RateLimit-Policy") == ['"route";q=1000;w=1']
        [state] = answer.getall("RateLimit")
        assert state.startswith('"route";r=') and state.endswith(";t=0")


# --------------------------------------------------------------------------- 3: close codes, log


async def test_close_codes_pass_both_ways_and_the_access_line_is_written_at_the_end(env: Env) -> None:
    auth = {"Authorization": f"Bearer {env.token}"}
    by_client = rid("client-closes")
    async with websocket(
        env.url(f"/echo/ws?id={by_client}"), headers={**auth, "X-Request-Id": by_client}
    ) as connected:
        ws = connected.ws
        hello_size = len(json.dumps(connected.hello))
        await ws.send_str("12345")
        assert await ws.receive_str(timeout=5) == "12345"
        await ws.send_bytes(b"abc")
        assert await ws.receive_bytes(timeout=5) == b"abc"
        await asyncio.sleep(0.3)
        await ws.close(code=4000, message=b"done here")
    await wait_for(lambda: by_client in env.upstreams.closes)
    assert env.upstreams.closes[by_client] == (WSMsgType.CLOSE, 4000, "done here")

    by_upstream = rid("upstream-closes")
    async with websocket(
        env.url(f"/echo/ws?id={by_upstream}"),
        protocols=("chat", f"bearer.{env.token}"),
        headers={"X-Request-Id": by_upstream},
    ) as connected:
        ws = connected.ws
        await ws.send_str("cmd:close:4001:upstream says bye")
        message = await ws.receive(timeout=5)
        assert message.type is WSMsgType.CLOSE
        assert (message.data, message.extra) == (4001, "upstream says bye")
        assert ws.close_code == 4001

    line = await access_line(env.process, by_client)
    assert line["status"] == 101 and line["upstream_status"] == 101
    assert line["closed_by"] == "client"
    assert line["bytes_in"] == len("12345") + len(b"abc")
    assert line["bytes_out"] == hello_size + len("12345") + len(b"abc")
    assert line["socket_ms"] >= 300 and line["duration_ms"] >= line["socket_ms"]
    assert line["user"] == "svc" and line["route"] == "echo" and line["path"] == "/echo/ws"

    line = await access_line(env.process, by_upstream)
    assert line["status"] == 101 and line["closed_by"] == "upstream"
    assert line["bytes_in"] == len("cmd:close:4001:upstream says bye")
    assert line["bytes_out"] > 0 and line["socket_ms"] >= 0

    assert env.token not in env.process.logs()  # it was a bearer entry in the second handshake


async def test_bytes_out_counts_bytes_of_text_messages(env: Env) -> None:
    conn = rid("utf8")
    text = "€€€"  # 3 characters, 9 bytes
    async with websocket(
        env.url(f"/echo/ws?id={conn}"), headers={"Authorization": f"Bearer {env.token}", "X-Request-Id": conn}
    ) as connected:
        hello_size = len(json.dumps(connected.hello).encode())
        await connected.ws.send_str(text)
        assert await connected.ws.receive_str(timeout=5) == text
    line = await access_line(env.process, conn)
    assert line["bytes_in"] == 9
    assert line["bytes_out"] == hello_size + 9


# --------------------------------------------------------------------------- 4: refusals


def _lone_bearer(env: Env) -> list[tuple[str, str]]:
    return handshake_headers(Sec_WebSocket_Protocol=f"bearer.{env.token}")


def _two_bearers(env: Env) -> list[tuple[str, str]]:
    return handshake_headers(Sec_WebSocket_Protocol=f"chat, bearer.{env.token}, bearer.{env.token}")


def _two_bearers_two_lines(env: Env) -> list[tuple[str, str]]:
    return handshake_headers() + [
        ("Sec-WebSocket-Protocol", f"chat, bearer.{env.token}"),
        ("Sec-WebSocket-Protocol", f"bearer.{env.outsider}"),
    ]


def _bearer_and_authorization(env: Env) -> list[tuple[str, str]]:
    return handshake_headers(token=env.token, Sec_WebSocket_Protocol=f"chat, bearer.{env.token}")


REFUSALS = {
    # name: (path, headers, body, status, error)
    "no credential": ("/echo/ws", lambda env: handshake_headers(), b"", 401, "missing_token"),
    "unknown token": (
        "/echo/ws",
        lambda env: handshake_headers(token="gw_" + "A" * 43),
        b"",
        401,
        "invalid_token",
    ),
    "role without echo:read": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.outsider),
        b"",
        403,
        "forbidden",
    ),
    "writer on deep": (
        "/echo/deep/ws",
        lambda env: handshake_headers(token=env.token),
        b"",
        403,
        "forbidden",
    ),
    "only the bearer entry": ("/echo/ws", _lone_bearer, b"", 400, "bad_request"),
    "two bearer entries": ("/echo/ws", _two_bearers, b"", 400, "bad_request"),
    "two bearer entries on two lines": ("/echo/ws", _two_bearers_two_lines, b"", 400, "bad_request"),
    "bearer entry and Authorization": ("/echo/ws", _bearer_and_authorization, b"", 400, "bad_request"),
    "access_token in the query": (
        "/echo/ws?access_token={token}",
        lambda env: handshake_headers(),
        b"",
        401,
        "missing_token",
    ),
    "token in the query": (
        "/echo/ws?token={token}&bearer={token}",
        lambda env: handshake_headers(Sec_WebSocket_Protocol="chat"),
        b"",
        401,
        "missing_token",
    ),
    "version 8": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, Sec_WebSocket_Version="8"),
        b"",
        400,
        "bad_request",
    ),
    "no version": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, Sec_WebSocket_Version=""),
        b"",
        400,
        "bad_request",
    ),
    "key not 16 bytes": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, key=base64.b64encode(b"short").decode()),
        b"",
        400,
        "bad_request",
    ),
    "key not base64": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, key="not base64 at all!!!!!=="),
        b"",
        400,
        "bad_request",
    ),
    "body with Content-Length": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, Content_Length="5"),
        b"hello",
        400,
        "bad_request",
    ),
    "chunked body": (
        "/echo/ws",
        lambda env: handshake_headers(token=env.token, Transfer_Encoding="chunked"),
        b"5\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusals(env: Env, case: str) -> None:
    path, headers, body, status, error = REFUSALS[case]
    conn = rid("refused")
    separator = "&" if "?" in path else "?"
    target = path.format(token=env.token) + f"{separator}id={conn}"
    answer = await handshake(env, target, [*headers(env), ("X-Request-Id", conn)], body)
    assert answer.status == status, answer.body
    refusal = answer.json()
    assert refusal["error"] == error and refusal["detail"]
    assert "Upgrade" not in answer.headers and "Sec-WebSocket-Accept" not in answer.headers
    assert env.token not in answer.body.decode()
    assert conn not in env.upstreams.opened  # the upstream never saw it
    line = await access_line(env.process, conn)
    assert line["status"] == status and line["error"] == error


async def test_firefox_connection_header_is_a_handshake(env: Env) -> None:
    conn = rid("firefox")
    key = new_key()
    async with raw_connection(env) as (reader, writer):
        headers = handshake_headers(token=env.token, key=key, connection="keep-alive, Upgrade")
        writer.write(request_bytes(f"/echo/ws?id={conn}", headers))
        answer = await read_answer(reader)
        assert answer.status == 101
        assert answer.headers["Sec-WebSocket-Accept"] == accept_for(key)
        assert answer.headers["Upgrade"].lower() == "websocket"
        opcode, hello = await read_frame(reader)
        assert opcode == 0x1 and json.loads(hello)["path"] == f"/echo/ws?id={conn}"
        writer.write(masked_frame(0x1, b"from firefox"))
        assert await read_frame(reader) == (0x1, b"from firefox")
        writer.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
        opcode, payload = await read_frame(reader)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1000


# --------------------------------------------------------------------------- 5: Origin


async def test_origin_is_checked_on_a_cors_route(env: Env) -> None:
    conn = rid("evil-origin")
    answer = await handshake(
        env,
        f"/app/ws?id={conn}",
        handshake_headers(Origin="http://evil.example", Sec_WebSocket_Protocol=f"chat, bearer.{env.token}"),
    )
    assert answer.status == 403 and answer.json()["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert conn not in env.upstreams.opened

    conn = rid("fixed-origin")
    async with websocket(
        env.url(f"/app/ws?id={conn}"),
        origin="http://fixed.example:8000",
        protocols=(f"bearer.{env.token}", "superchat"),
    ) as connected:
        assert connected.ws.protocol == "superchat"
        assert connected.seen.response is not None
        assert connected.seen.response["Access-Control-Allow-Origin"] == "http://fixed.example:8000"
        received = connected.hello["headers"]
        assert values(received, "X-Service-User") == ["svc"]
        assert values(received, "Sec-WebSocket-Protocol") == ["superchat"]
        await connected.ws.send_str("cors")
        assert await connected.ws.receive_str(timeout=5) == "cors"


# --------------------------------------------------------------------------- 6: the upstream's answer


def raw_exchange(env: Env, path_start: str) -> RawExchange:
    found = [exchange for exchange in env.upstreams.raw if exchange.path.startswith(path_start)]
    assert len(found) == 1, [exchange.path for exchange in env.upstreams.raw]
    return found[0]


async def test_a_non_101_answer_goes_back_as_plain_http_and_nothing_is_tunnelled(env: Env) -> None:
    conn = rid("refuse")
    async with raw_connection(env) as (reader, writer):
        headers = handshake_headers(token=env.token, Sec_WebSocket_Protocol="chat")
        writer.write(request_bytes(f"/raw/refuse?id={conn}", headers))
        answer = await read_answer(reader)
        assert answer.status == 403
        assert answer.json() == {"error": "not_today", "detail": "the upstream says no"}
        assert answer.headers["X-Upstream"] == "raw"
        assert "Upgrade" not in answer.headers and "Sec-WebSocket-Accept" not in answer.headers
        exchange = raw_exchange(env, f"/raw/refuse?id={conn}")
        head = exchange.head.decode().lower()
        assert "upgrade: websocket" in head and "x-service-user: svc" in head
        # A client that goes on as if it had a WebSocket: its frame is not delivered upstream.
        frame = masked_frame(0x1, b"should never arrive")
        writer.write(frame)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(2):
                after = await reader.read()  # the gateway reads it as HTTP: refused, closed
                assert not after or b" 400 " in after.split(b"\r\n", 1)[0], after
        await asyncio.sleep(0.3)
        assert exchange.after == b""  # the upstream's connection got nothing more
        assert all(frame not in bytes(other.connection.received) for other in env.upstreams.raw)
    line = await access_line(env.process, answer.headers["X-Request-Id"])
    assert line["status"] == 403 and line["upstream_status"] == 403
    assert "closed_by" not in line


@pytest.mark.parametrize(
    "path",
    ["/raw/wrong-accept", "/raw/unoffered"],
    ids=["wrong Sec-WebSocket-Accept", "unoffered subprotocol"],
)
async def test_a_101_that_is_not_this_websockets_is_a_502(env: Env, path: str) -> None:
    conn = rid("bad-101")
    async with raw_connection(env) as (reader, writer):
        headers = handshake_headers(token=env.token, Sec_WebSocket_Protocol="chat, superchat")
        writer.write(request_bytes(f"{path}?id={conn}", headers + [("X-Request-Id", conn)]))
        answer = await read_answer(reader)
        assert answer.status == 502
        assert answer.json()["error"] == "upstream_unavailable"
        assert "Sec-WebSocket-Accept" not in answer.headers and "Upgrade" not in answer.headers
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(0.5):
                rest = await reader.read(65536)
                assert b"leak" not in rest
    exchange = raw_exchange(env, f"{path}?id={conn}")
    assert "sec-websocket-protocol: chat, superchat" in exchange.head.decode().lower()
    assert exchange.after == b""  # the gateway sent no frame on a socket it refused
    line = await access_line(env.process, conn)
    assert line["status"] == 502 and line["error"] == "upstream_unavailable"


# --------------------------------------------------------------------------- 7: not a WebSocket


def upgrade_free(received: list[list[str]]) -> None:
    assert values(received, "Upgrade") == []
    for value in values(received, "Connection"):
        assert "upgrade" not in value.lower()


async def test_h2c_upgrade_on_a_websocket_route_is_plain_http(env: Env) -> None:
    conn = rid("h2c")
    answer = await handshake(
        env,
        f"/echo/h2c?id={conn}",
        [
            ("Authorization", f"Bearer {env.token}"),
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    )
    assert answer.status == 200
    echo = answer.json()
    assert echo["websocket"] is False
    upgrade_free(echo["headers"])
    assert values(echo["headers"], "HTTP2-Settings") == []
    assert values(echo["headers"], "X-Service-User") == ["svc"]
    assert "Upgrade" not in answer.headers


async def test_a_handshake_on_a_route_without_websocket_is_plain_http(env: Env) -> None:
    headers = handshake_headers(token=env.token, Sec_WebSocket_Protocol=f"chat, bearer.{env.outsider}")
    answer = await handshake(env, "/strip/ws", headers)
    assert answer.status == 200
    assert "Upgrade" not in answer.headers and "Sec-WebSocket-Accept" not in answer.headers
    echo = answer.json()
    assert echo["raw_path"] == "/ws"
    upgrade_free(echo["headers"])
    assert values(echo["headers"], "X-Service-User") == ["svc"]
    # The bearer entry is stripped on every route, credential or not.
    assert values(echo["headers"], "Sec-WebSocket-Protocol") == ["chat"]
    assert all(env.outsider not in value and env.token not in value for _, value in echo["headers"])

    # … and it is a credential only on websocket routes.
    answer = await handshake(
        env, "/strip/ws", handshake_headers(Sec_WebSocket_Protocol=f"chat, bearer.{env.token}")
    )
    assert answer.status == 401 and answer.json()["error"] == "missing_token"


# --------------------------------------------------------------------------- 8, 9: idle, size


async def test_an_idle_socket_outlives_the_route_timeout(env: Env) -> None:
    conn = rid("idle")
    async with websocket(env.url(f"/echo/ws?id={conn}"), protocols=("chat", f"bearer.{env.token}")) as c:
        await c.ws.send_str("before")
        assert await c.ws.receive_str(timeout=5) == "before"
        await asyncio.sleep(3.0)  # the echo route's timeout is 2 s
        assert not c.ws.closed
        await c.ws.send_str("after")
        assert await c.ws.receive_str(timeout=5) == "after"
        await c.ws.send_bytes(b"\x01" * 1000)
        assert await c.ws.receive_bytes(timeout=5) == b"\x01" * 1000


_EXACTLY_4_MIB = (
    "aiohttp 3.14's WebSocket reader refuses a frame whose payload is >= max_msg_size "
    "(_websocket/reader_py.py: `if self._payload_bytes_to_read >= self._max_msg_size - partial_len`), "
    "and gateway/websocket.py gives it MAX_MESSAGE (4 MiB) as the limit, so a message of exactly "
    "4 MiB is closed with 1009: the limit in effect is 4 MiB - 1 byte"
)


async def test_a_4_mib_message_from_the_client_passes(env: Env) -> None:
    conn = rid("4mib-in")
    async with websocket(env.url(f"/echo/ws?id={conn}"), protocols=("chat", f"bearer.{env.token}")) as c:
        message = os.urandom(LIMIT)
        with contextlib.suppress(ConnectionError):  # the gateway may close while this is sent
            await c.ws.send_bytes(message)  # echoed by the upstream: both directions
        reply = await c.ws.receive(timeout=10)
        assert reply.type is WSMsgType.BINARY, (reply.type, reply.data, c.ws.close_code)
        assert reply.data == message


async def test_a_4_mib_message_from_the_upstream_passes(env: Env) -> None:
    conn = rid("4mib-out")
    async with websocket(env.url(f"/echo/ws?id={conn}"), protocols=("chat", f"bearer.{env.token}")) as c:
        await c.ws.send_str(f"cmd:big:{LIMIT}")
        reply = await c.ws.receive(timeout=10)
        assert reply.type is WSMsgType.BINARY, (reply.type, reply.data)
        assert reply.data == b"u" * LIMIT


async def test_a_message_just_under_4_mib_passes_both_ways(env: Env) -> None:
    conn = rid("under-4mib")
    async with websocket(env.url(f"/echo/ws?id={conn}"), protocols=("chat", f"bearer.{env.token}")) as c:
        message = os.urandom(LIMIT - 1)
        await c.ws.send_bytes(message)
        reply = await c.ws.receive(timeout=10)
        assert reply.type is WSMsgType.BINARY, (reply.type, reply.data)
        assert reply.data == message
        await c.ws.send_str("still open")
        assert await c.ws.receive_str(timeout=5) == "still open"


async def send_too_large_frame_head(env: Env, conn: str) -> None:
    """Open a socket, send the head of a 4 MiB + 1 frame and a little of its payload, and expect
    the gateway's 1009 (it refuses on the declared length)."""
    async with raw_connection(env) as (reader, writer):
        headers = handshake_headers(token=env.token, X_Request_Id=conn)
        writer.write(request_bytes(f"/echo/ws?id={conn}", headers))
        assert (await read_answer(reader)).status == 101
        assert (await read_frame(reader))[0] == 0x1  # the upstream's hello
        mask = os.urandom(4)
        writer.write(bytes([0x82, 0x80 | 127]) + (LIMIT + 1).to_bytes(8, "big") + mask + b"x" * 1000)
        opcode, payload = await read_frame(reader)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1009
    await wait_for(lambda: conn in env.upstreams.closes)  # the upstream side is closed too


async def test_a_larger_message_from_the_client_is_refused_with_1009(env: Env) -> None:
    conn = rid("too-big-in")
    await send_too_large_frame_head(env, conn)
    assert env.upstreams.closes[conn][0] is WSMsgType.CLOSE
    line = await access_line(env.process, conn)
    assert line["status"] == 101 and line["closed_by"] == "client" and line["bytes_in"] == 0


async def test_the_upstream_is_told_1009_when_the_clients_message_is_too_large(env: Env) -> None:
    conn = rid("too-big-upstream-code")
    await send_too_large_frame_head(env, conn)
    assert env.upstreams.closes[conn][1] == 1009


async def test_a_client_that_sends_a_whole_larger_message_receives_1009(env: Env) -> None:
    conn = rid("too-big-whole")
    async with websocket(
        env.url(f"/echo/ws?id={conn}"),
        protocols=("chat", f"bearer.{env.token}"),
        headers={"X-Request-Id": conn},
    ) as c:
        # The gateway closes while the message is still being sent (the rest is never read).
        with contextlib.suppress(ConnectionError):
            await c.ws.send_bytes(b"x" * (LIMIT + 1))
        message = await c.ws.receive(timeout=10)
        assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)
    await wait_for(lambda: conn in env.upstreams.closes)
    line = await access_line(env.process, conn)
    assert line["closed_by"] == "client" and line["bytes_in"] == 0


async def test_a_larger_message_from_the_upstream_closes_1009(env: Env) -> None:
    conn = rid("too-big-out")
    async with websocket(
        env.url(f"/echo/ws?id={conn}"),
        protocols=("chat", f"bearer.{env.token}"),
        headers={"X-Request-Id": conn},
    ) as c:
        await c.ws.send_str(f"cmd:big:{LIMIT + 1}")
        message = await c.ws.receive(timeout=10)
        assert message.type is WSMsgType.CLOSE, message
        assert message.data == 1009
    line = await access_line(env.process, conn)
    assert line["closed_by"] == "upstream"
    assert line["bytes_out"] == len(json.dumps(c.hello))  # nothing of the big message


# --------------------------------------------------------------------------- 10: back-pressure


async def test_back_pressure_holds_the_gateways_memory_while_50_mb_stream_through(env: Env) -> None:
    # A fresh process: a baseline that earlier tests' 4 MiB messages had not grown.
    process = GatewayProcess(env.config)
    try:
        await process.wait_ready()
        conn = rid("stream")
        count, size = 50, MiB
        async with websocket(
            env.url(f"/echo/ws?id={conn}", process),
            headers={"Authorization": f"Bearer {env.token}"},
        ) as c:
            for _ in range(5):  # warm the relay up, small messages only
                await c.ws.send_bytes(b"w" * 4096)
                assert await c.ws.receive_bytes(timeout=5) == b"w" * 4096
            await asyncio.sleep(0.2)
            baseline = process.rss_bytes()
            peak = baseline
            sampling = True

            async def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, process.rss_bytes())
                    await asyncio.sleep(0.01)

            sampler = asyncio.create_task(sample())
            try:
                await c.ws.send_str(f"cmd:stream:{count}:{size}")
                await asyncio.sleep(2.0)  # read nothing at first: every buffer on the way fills
                for index in range(count):
                    if index < 10:
                        await asyncio.sleep(0.05)  # then slowly
                    data = await c.ws.receive_bytes(timeout=10)
                    assert len(data) == size and data == pattern(index, size), f"message {index} differs"
            finally:
                sampling = False
                await sampler
            await c.ws.send_str("after the stream")
            assert await c.ws.receive_str(timeout=5) == "after the stream"
        grown = peak - baseline
        assert grown < 40 * MiB, f"RSS grew {grown / MiB:.1f} MiB while {count * size // MiB} MiB streamed"
    finally:
        process.stop()


# --------------------------------------------------------------------------- 11: the gauge


async def gauge(env: Env, route: str) -> float | None:
    async with aiohttp.ClientSession() as session:
        async with session.get(env.process.admin + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'gateway_websockets_open{{route="{route}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_the_open_websockets_gauge(env: Env) -> None:
    deadline = time.monotonic() + 5
    while await gauge(env, "echo") not in (None, 0.0):  # a socket of an earlier test still ending
        assert time.monotonic() < deadline, "a socket of an earlier test is still open"
        await asyncio.sleep(0.05)
    conn = rid("gauge")
    async with websocket(env.url(f"/echo/ws?id={conn}"), protocols=("chat", f"bearer.{env.token}")) as c:
        await c.ws.send_str("open")
        assert await c.ws.receive_str(timeout=5) == "open"
        assert await gauge(env, "echo") == 1.0
        async with websocket(env.url("/app/ws"), protocols=("chat", f"bearer.{env.token}")):
            assert await gauge(env, "browser") == 1.0
            assert await gauge(env, "echo") == 1.0
    deadline = time.monotonic() + 5
    while (await gauge(env, "echo"), await gauge(env, "browser")) != (0.0, 0.0):
        assert time.monotonic() < deadline, "the gauge did not go back to 0 after the sockets closed"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- never logged


async def test_no_credential_is_ever_logged(env: Env) -> None:
    """After bearer entries in refusals and in a relayed socket (and, run with the whole file, in
    every test above), neither token secret appears anywhere in the gateway's output."""
    ids = [rid("log-lone"), rid("log-two"), rid("log-with-authorization")]
    await handshake(env, "/echo/ws", [*_lone_bearer(env), ("X-Request-Id", ids[0])])
    await handshake(env, "/echo/ws", [*_two_bearers_two_lines(env), ("X-Request-Id", ids[1])])
    await handshake(env, "/echo/ws", [*_bearer_and_authorization(env), ("X-Request-Id", ids[2])])
    relayed = rid("log-relayed")
    async with websocket(
        env.url("/echo/ws"), protocols=(f"bearer.{env.token}", "chat"), headers={"X-Request-Id": relayed}
    ) as c:
        await c.ws.send_str(f"bearer.{env.outsider}")  # a message is data, never a credential
        assert await c.ws.receive_str(timeout=5) == f"bearer.{env.outsider}"
        await c.ws.close()
    for request_id in [*ids, relayed]:
        await access_line(env.process, request_id)
    logs = env.process.logs()
    assert env.token not in logs
    assert env.outsider not in logs
