"""WebSocket through a real `gateway serve` from a real browser (Debian's chromium via playwright).

A browser cannot set `Authorization` on a WebSocket, so the page sends its token as the
subprotocol entry `bearer.<token>` beside the real one: `new WebSocket(url, ["chat",
"bearer." + token])`. From an origin allowed for the token's user the socket opens, the
upstream sees "chat" only (never the bearer entry) and the service user, and "chat" comes
back to the page. From any other origin the same token is refused at the handshake (403
`origin_not_allowed`: the defence against cross-site WebSocket hijacking), so the page's
socket never opens and the upstream never hears of it.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import load_config
from tests.process import GatewayProcess

USER = "spa"

POLICIES = """
roles:
  reader:
    permissions: ["echo:read"]
routes:
  browser:
    rules:
      - paths: ["/app/**"]
        require: "echo:read"
"""

# The page's whole client: open the socket with the token as a subprotocol entry, answer the
# upstream's first message with one of its own, close after the echo; every event is recorded.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ws</title></head><body>
<script>
window.runSocket = (url, token) => new Promise((resolve) => {
  const events = [];
  let messages = 0;
  const ws = new WebSocket(url, ["chat", "bearer." + token]);
  ws.onopen = () => events.push({type: "open", protocol: ws.protocol});
  ws.onmessage = (event) => {
    messages += 1;
    events.push({type: "message", data: event.data});
    if (messages === 1) ws.send("hello from the page");
    else ws.close(1000, "done");
  };
  ws.onerror = () => events.push({type: "error"});
  ws.onclose = (event) => {
    events.push({type: "close", code: event.code, wasClean: event.wasClean});
    resolve(events);
  };
});
</script>
</body></html>
"""


@dataclass
class Upstream:
    """A real aiohttp WebSocket upstream that records every handshake it receives."""

    server: TestServer
    handshakes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class Setup:
    gateway: GatewayProcess
    upstream: Upstream
    token: str
    allowed_origin: str  # in the user's allowed_origins
    other_origin: str  # allowed for nobody

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.gateway.proxy_port}{path}"


@pytest.fixture
async def ws_upstream() -> AsyncIterator[Upstream]:
    """Echo upstream: its first message reports what the handshake carried, then every text
    message comes back prefixed with "echo: "."""
    handshakes: list[dict[str, Any]] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        seen = {
            "path": request.path,
            "subprotocol": request.headers.get("Sec-WebSocket-Protocol"),
            "user": request.headers.get("X-Service-User"),
            "origin": request.headers.get("Origin"),
        }
        handshakes.append(seen)
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        await ws.send_str(json.dumps(seen))
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str("echo: " + message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", socket)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Upstream(server, handshakes)
    await server.close()


async def serve_page() -> TestServer:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def write_ws_config(directory: Path, upstream_url: str, extra_origin: str) -> Path:
    """One `browser` route (/app) with a cors block and `websocket: true` in front of `upstream_url`."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "policy.yaml").write_text(textwrap.dedent(POLICIES))
    config = directory / "gateway.yaml"
    config.write_text(
        "listeners:\n"
        '  proxy: "127.0.0.1:0"\n'
        '  admin: "127.0.0.1:0"\n'
        f'store:\n  url: "sqlite+aiosqlite:///{directory / "gateway.db"}"\n'
        "routes:\n"
        f'  - name: browser\n    prefix: /app\n    upstream: "{upstream_url}"\n    timeout: 5\n'
        "    websocket: true\n"
        "    cors:\n"
        f'      origins: {{store: true, extra: ["{extra_origin}"]}}\n'
        "      allow_headers: [Authorization, Content-Type]\n"
        "      expose_headers: [X-Request-Id]\n"
    )
    return config


async def user_token(config: Path, origins: list[str]) -> str:
    """Create the service user (role reader, `origins` allowed) and a token; the secret."""
    gateway = await Gateway.open(load_config(config, env={}))
    try:
        await gateway.directory.create_user(USER, actor="test", roles=["reader"], origins=origins)
        _, token = await gateway.directory.create_token(USER, "web", actor="test")
        return token
    finally:
        await gateway.close()


@pytest.fixture
async def setup(tmp_path: Path, ws_upstream: Upstream) -> AsyncIterator[Setup]:
    allowed_page, other_page = await serve_page(), await serve_page()
    allowed = f"http://127.0.0.1:{allowed_page.port}"
    other = f"http://127.0.0.1:{other_page.port}"
    # The route's fixed origin is some third origin: neither page passes through it.
    config = write_ws_config(tmp_path, ws_upstream.url, "http://fixed.example:8000")
    token = await user_token(config, [allowed])
    process = GatewayProcess(config)
    try:
        await process.wait_ready()
        yield Setup(process, ws_upstream, token, allowed, other)
    finally:
        process.stop()
        await allowed_page.close()
        await other_page.close()


async def run_socket(browser: Any, origin: str, url: str, token: str) -> list[dict[str, Any]]:
    """Open the page at `origin`, run its socket against `url`; the events it saw, in order."""
    page = await browser.new_page()
    try:
        await page.goto(origin + "/")
        events = await asyncio.wait_for(
            page.evaluate("([url, token]) => window.runSocket(url, token)", [url, token]), timeout=10
        )
        return list(events)
    finally:
        await page.close()


async def access_line(process: GatewayProcess, path: str) -> dict[str, Any]:
    """The gateway's access line for `path` (request lines are flushed about once a second)."""
    for _ in range(50):
        for line in process.logs().splitlines():
            if line.startswith("{") and '"logger":"gateway.access"' in line:
                fields = json.loads(line)
                if fields.get("path") == path:
                    return dict(fields)
        await asyncio.sleep(0.1)
    pytest.fail(f"no access line for {path} in:\n{process.logs()}")


async def test_socket_from_the_users_origin_is_relayed(browser: Any, setup: Setup) -> None:
    events = await run_socket(browser, setup.allowed_origin, setup.ws_url("/app/ws/allowed"), setup.token)
    kinds = [event["type"] for event in events]
    assert kinds == ["open", "message", "message", "close"], (events, setup.gateway.logs())
    assert events[0]["protocol"] == "chat"  # the upstream's choice, handed back by the gateway

    first = json.loads(events[1]["data"])
    assert first["path"] == "/app/ws/allowed"
    assert first["user"] == USER
    assert first["subprotocol"] == "chat"  # the bearer entry never reaches the upstream
    assert "bearer." not in events[1]["data"] and setup.token not in events[1]["data"]
    assert first["origin"] == setup.allowed_origin

    assert events[2]["data"] == "echo: hello from the page"
    assert events[3]["code"] == 1000 and events[3]["wasClean"] is True, events
    assert len(setup.upstream.handshakes) == 1
    line = await access_line(setup.gateway, "/app/ws/allowed")
    assert (line["status"], line["upstream_status"], line["user"]) == (101, 101, USER), line


async def test_socket_from_another_origin_never_opens(browser: Any, setup: Setup) -> None:
    events = await run_socket(browser, setup.other_origin, setup.ws_url("/app/ws/other"), setup.token)
    kinds = [event["type"] for event in events]
    assert "open" not in kinds and "message" not in kinds, events
    assert kinds[-1] == "close" and events[-1]["code"] == 1006, events
    assert "error" in kinds, events
    # Refused at the handshake: the upstream never heard of this socket.
    assert setup.upstream.handshakes == [], setup.upstream.handshakes
    line = await access_line(setup.gateway, "/app/ws/other")
    assert (line["status"], line["error"], line["upstream_status"]) == (403, "origin_not_allowed", None), line
