"""Revocation at the edges an outside review found: a credential revoked while its WebSocket
handshake is upstream, a revoked signing key's open sockets, a role a key lost and its user
got back, and verified tokens across a reload that changes the audience."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from gateway import keyring
from gateway.app import Gateway
from gateway.config import load_config
from gateway.services import Directory
from tests.conftest import proxy_test_server, write_config


async def _websocket(request: web.Request) -> web.StreamResponse:
    if request.path.endswith("/slow"):
        await asyncio.sleep(1.0)  # the handshake stays upstream for a second
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return web.json_response({"roles": request.headers.get("X-Service-User-Roles")})
    socket = web.WebSocketResponse(protocols=("chat",))
    await socket.prepare(request)
    async for message in socket:
        if message.type is WSMsgType.TEXT:
            await socket.send_str("echo:" + message.data)
    return socket


@dataclass
class Running:
    gateway: Gateway
    client: TestClient
    directory: Directory
    config: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.client.port}{path}"

    async def get(self, token: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.client.session.get(self.url("/echo/x"), headers=headers) as answer:
            return answer.status, await answer.json()

    async def exchange(self, key_id: str, secret: str) -> str:
        form = {"grant_type": "client_credentials", "client_id": key_id, "client_secret": secret}
        async with self.client.session.post(self.url("/.gateway/token"), data=form) as answer:
            assert answer.status == 200, await answer.text()
            return str((await answer.json())["access_token"])


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _websocket)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    config = write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{tmp_path}/store.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        route_options="websocket: true",
    )
    gateway = await Gateway.open(load_config(config, env={}))
    client = TestClient(proxy_test_server(gateway))
    await client.start_server()
    try:
        directory = Directory(gateway.store, lambda: gateway.pipeline.settings.table)
        yield Running(gateway, client, directory, config)
    finally:
        await client.close()
        await gateway.close()
        await upstream.close()


async def closed_with(socket: aiohttp.ClientWebSocketResponse, within: float) -> int | None:
    """The close code the client receives within `within` seconds (None: still open)."""
    try:
        message = await socket.receive(timeout=within)
    except TimeoutError:
        return None
    return int(message.data) if message.type is WSMsgType.CLOSE else None


async def test_a_token_revoked_while_its_handshake_is_upstream_never_gets_a_live_socket(
    running: Running,
) -> None:
    await running.directory.create_user("svc", actor="test", roles=["writer"])
    _, token = await running.directory.create_token("svc", "t", actor="test")
    connecting = asyncio.create_task(
        running.client.session.ws_connect(running.url("/echo/ws/slow"), protocols=("chat", "bearer." + token))
    )
    await asyncio.sleep(0.4)
    await running.directory.delete_token("svc", "t", actor="test")
    await running.gateway.catch_up()
    socket = await connecting
    assert await closed_with(socket, within=1.5) == 1008
    for _ in range(40):  # the relay ends once the close handshake is done
        if len(running.gateway.sockets) == 0:
            break
        await asyncio.sleep(0.05)
    assert len(running.gateway.sockets) == 0


async def test_revoking_a_signing_key_closes_the_sockets_its_tokens_opened(running: Running) -> None:
    await running.directory.create_user("svc", actor="test", roles=["writer"])
    view, secret = await running.directory.create_key("svc", actor="test")
    token = await running.exchange(view.id, secret)
    protocols = ("chat", "bearer." + token)
    socket = await running.client.session.ws_connect(running.url("/echo/ws"), protocols=protocols)
    await socket.send_str("hi")
    assert (await socket.receive(timeout=2)).data == "echo:hi"
    started = time.monotonic()
    await keyring.revoke(running.gateway.store, jwt.get_unverified_header(token)["kid"], actor="test")
    await running.gateway.catch_up()
    assert await closed_with(socket, within=1.5) == 1008
    assert time.monotonic() - started < 1.5
    assert (await running.get(token))[0] == 401


async def test_a_role_a_key_lost_stays_lost_in_its_tokens_when_the_user_regains_it(running: Running) -> None:
    await running.directory.create_user("svc", actor="test", roles=["reader", "other"])
    view, secret = await running.directory.create_key("svc", actor="test", roles=["reader"])
    token = await running.exchange(view.id, secret)
    assert await running.get(token) == (200, {"roles": "reader"})
    await running.directory.update_user("svc", actor="test", remove_roles=["reader"])
    await running.gateway.catch_up()
    assert (await running.get(token))[0] == 403
    await running.directory.update_user("svc", actor="test", add_roles=["reader"])
    await running.gateway.catch_up()
    status, body = await running.get(token)
    assert (status, body["error"]) == (403, "forbidden"), body


async def test_a_reload_that_changes_the_audience_reaches_tokens_already_verified(running: Running) -> None:
    await running.directory.create_user("svc", actor="test", roles=["writer"])
    view, secret = await running.directory.create_key("svc", actor="test")
    token = await running.exchange(view.id, secret)
    assert (await running.get(token))[0] == 200
    running.config.write_text(running.config.read_text() + "signing: {audience: https://new.example}\n")
    assert running.gateway.reload()
    status, body = await running.get(token)
    assert (status, body["error"]) == (401, "invalid_token"), body
