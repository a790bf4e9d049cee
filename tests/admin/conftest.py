"""Fixtures of the admin API tests: the real gateway in this process, a client on its admin app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy

from gateway.admin import build_admin_app
from gateway.app import Gateway
from gateway.config import load_config
from tests.conftest import proxy_test_server, write_config

AppClient = TestClient[web.Request, web.Application]


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
    client: AppClient
    proxy: AppClient
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
        response: ClientResponse = await self.client.request(method, path, json=json, headers=sent, data=data)
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
async def make_admin(
    tmp_path: Path, store_url: str, upstream: TestServer
) -> AsyncIterator[Callable[..., Awaitable[Admin]]]:
    """Factory: the real gateway on the parametrised store, an admin `root` and its token `adm`."""
    started: list[tuple[Gateway, AppClient, AppClient]] = []

    async def make(**options: str) -> Admin:
        upstream_url = str(upstream.make_url("")).rstrip("/")
        path = write_config(tmp_path, store_url=store_url, upstream_url=upstream_url, **options)
        gateway = await Gateway.open(load_config(path, env={}))
        client = TestClient(TestServer(build_admin_app(gateway.admin_context()), host="127.0.0.1"))
        proxy = TestClient(proxy_test_server(gateway))
        started.append((gateway, client, proxy))
        await client.start_server()
        await proxy.start_server()
        await gateway.directory.create_user("root", actor="test", admin=True)
        _, secret = await gateway.directory.create_token("root", "adm", actor="test")
        return Admin(gateway, client, proxy, secret, path)

    yield make
    for gateway, client, proxy in started:
        await proxy.close()
        await client.close()
        await gateway.close()


@pytest.fixture
async def admin(make_admin: Callable[..., Awaitable[Admin]]) -> Admin:
    """The default gateway (routes echo, deep, strip) with its admin listener."""
    return await make_admin()


async def issue(admin: Admin, user: str = "svc", name: str = "t1", **fields: Any) -> dict[str, Any]:
    """Create `user` (role writer) if needed and issue a token through the API; the create answer."""
    if (await admin.call("GET", f"/v1/service-users/{user}")).status == 404:
        created = await admin.call("POST", "/v1/service-users", json={"name": user, "roles": ["writer"]})
        assert created.status == 201, created.text
    answer = await admin.call("POST", f"/v1/service-users/{user}/tokens", json={"name": name, **fields})
    assert answer.status == 201, answer.text
    body: dict[str, Any] = answer.body
    return body


def assert_error(answer: Answer, status: int, error: str, field: str | None = None) -> None:
    """`answer` is CONTRACT.md's JSON refusal `error` with X-Request-Id (and `field` for 422)."""
    assert answer.status == status, answer.text
    assert answer.body is not None and answer.body["error"] == error, answer.text
    assert isinstance(answer.body["detail"], str) and answer.body["detail"]
    assert answer.headers.get("X-Request-Id")
    if field is not None:
        assert answer.body.get("field") == field, answer.text
