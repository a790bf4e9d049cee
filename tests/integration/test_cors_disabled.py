"""CORS preflights after changes made through this instance's admin API: they apply at once.

Only active users' origins count (README "Calling the gateway from a browser app"), and a
change made through the admin API applies on its instance before the API answers, so a
preflight sent right after the answer already sees it: no settle, no sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from tests.conftest import Harness

APP = "http://app.example:3000"
AdminClient = TestClient[web.Request, web.Application]


@pytest.fixture
async def admin_client(harness: Harness) -> AsyncIterator[AdminClient]:
    """A client on the harness gateway's real admin app, sending an admin token."""
    await harness.gateway.directory.create_user("root", actor="test", admin=True)
    _, secret = await harness.gateway.directory.create_token("root", "adm", actor="test")
    client = TestClient(TestServer(build_admin_app(harness.gateway.admin_context()), host="127.0.0.1"))
    client.session.headers["Authorization"] = f"Bearer {secret}"
    await client.start_server()
    yield client
    await client.close()


async def call(client: AdminClient, method: str, path: str, body: Any = None) -> int:
    async with client.request(method, path, json=body) as response:
        await response.read()
        return response.status


async def preflight(harness: Harness) -> int:
    """The status of a browser's preflight from APP to the `browser` route (cors: origins from the store)."""
    headers = {"Origin": APP, "Access-Control-Request-Method": "PUT"}
    async with harness.client.options("/app/items", headers=headers) as response:
        body = await response.read()
        if response.status == 204:
            assert response.headers["Access-Control-Allow-Origin"] == APP
        else:
            assert response.status == 403 and b'"origin_not_allowed"' in body
            assert "Access-Control-Allow-Origin" not in response.headers
        return response.status


async def test_an_origin_only_disabled_users_allow_is_refused_at_once(
    harness: Harness, admin_client: AdminClient
) -> None:
    for name in ("spa-a", "spa-b"):
        user = {"name": name, "roles": ["reader"], "allowed_origins": [APP]}
        assert await call(admin_client, "POST", "/v1/service-users", user) == 201
    assert await preflight(harness) == 204
    assert await call(admin_client, "PATCH", "/v1/service-users/spa-a", {"disabled": True}) == 200
    assert await preflight(harness) == 204  # spa-b still allows it
    assert await call(admin_client, "PATCH", "/v1/service-users/spa-b", {"disabled": True}) == 200
    assert await preflight(harness) == 403
    assert await call(admin_client, "PATCH", "/v1/service-users/spa-b", {"disabled": False}) == 200
    assert await preflight(harness) == 204


async def test_origin_edits_and_deletion_apply_at_once(harness: Harness, admin_client: AdminClient) -> None:
    user = {"name": "spa", "roles": ["reader"], "allowed_origins": [APP]}
    assert await call(admin_client, "POST", "/v1/service-users", user) == 201
    assert await preflight(harness) == 204
    assert await call(admin_client, "PATCH", "/v1/service-users/spa", {"allowed_origins": []}) == 200
    assert await preflight(harness) == 403
    assert await call(admin_client, "PATCH", "/v1/service-users/spa", {"allowed_origins": [APP]}) == 200
    assert await preflight(harness) == 204
    assert await call(admin_client, "DELETE", "/v1/service-users/spa") == 204
    assert await preflight(harness) == 403
