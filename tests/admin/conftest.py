"""Fixtures of the admin API tests: the real gateway in this process, a client on its admin app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from gateway.admin import build_admin_app
from gateway.app import Gateway, build_proxy_app
from gateway.config import load_config
from tests.conftest import write_config


@dataclass
class Answer:
    """One admin API answer, read whole."""

    status: int
    body: Any
    headers: CIMultiDictProxy[str]
    text: str


@dataclass
class Admin:
    """A running gateway with clients on its admin and proxy apps, and an admin token."""

    gateway: Gateway
    client: TestClient
    proxy: TestClient
    token: str
    config: Path

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        token: str | None = "",
        headers: dict[str, str] | None = None,
        data: bytes | str | None = None,
    ) -> Answer:
        """Call the admin API (with the admin token unless `token` is given; None: no credentials)."""
        sent = dict(headers or {})
        credential = self.token if token == "" else token
        if credential is not None:
            sent["Authorization"] = f"Bearer {credential}"
        response: ClientResponse = await self.client.request(
            method, path, json=json, headers=sent, data=data
        )
        text = await response.text()
        body = None
        if response.content_type == "application/json" and text:
            body = await response.json()
        return Answer(response.status, body, response.headers, text)

    async def proxy_status(self, secret: str, path: str = "/echo/a") -> int:
        """The status a proxied GET with `secret` gets."""
        async with self.proxy.get(path, headers={"Authorization": f"Bearer {secret}"}) as response:
            await response.read()
            return response.status


@pytest.fixture
async def admin(tmp_path: Path, store_url: str, upstream: TestServer) -> AsyncIterator[Admin]:
    """The real gateway on the parametrised store, an admin `root` and its token `adm`."""
    path = write_config(tmp_path, store_url=store_url, upstream_url=str(upstream.make_url("")).rstrip("/"))
    gateway = await Gateway.open(load_config(path, env={}))
    client = TestClient(TestServer(build_admin_app(gateway.admin_context()), host="127.0.0.1"))
    proxy = TestClient(TestServer(build_proxy_app(gateway), host="127.0.0.1"))
    await client.start_server()
    await proxy.start_server()
    try:
        await gateway.directory.create_user("root", actor="test", admin=True)
        _, secret = await gateway.directory.create_token("root", "adm", actor="test")
        yield Admin(gateway, client, proxy, secret, path)
    finally:
        await proxy.close()
        await client.close()
        await gateway.close()
