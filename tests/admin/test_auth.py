"""Who may call the admin listener: admin tokens only on /v1, nothing needed for health and docs."""

from __future__ import annotations

import asyncio
import gc
import os
import re
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from gateway import tokens
from tests.admin.conftest import Admin, assert_error, issue

V1_ENDPOINTS = [
    ("GET", "/v1/service-users"),
    ("POST", "/v1/service-users"),
    ("GET", "/v1/service-users/svc"),
    ("PATCH", "/v1/service-users/svc"),
    ("DELETE", "/v1/service-users/svc"),
    ("GET", "/v1/service-users/svc/tokens"),
    ("POST", "/v1/service-users/svc/tokens"),
    ("POST", "/v1/service-users/svc/tokens/t1/reset"),
    ("POST", "/v1/service-users/svc/tokens/t1/expire"),
    ("DELETE", "/v1/service-users/svc/tokens/t1"),
    ("GET", "/v1/roles"),
    ("GET", "/v1/routes"),
    ("GET", "/v1/audit-events"),
]
REALM = 'Bearer realm="gateway-admin"'
REALM_ERROR = 'Bearer realm="gateway-admin", error="invalid_token"'


async def test_every_v1_endpoint_needs_a_token_and_health_does_not(admin: Admin) -> None:
    for method, path in V1_ENDPOINTS:
        answer = await admin.call(method, path, token=None, json={"name": "x"})
        assert_error(answer, 401, "missing_token")
        assert answer.headers["WWW-Authenticate"] == REALM, (method, path)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await admin.call("GET", path, token=None)).status == 200, path
    # Nothing changed: the refused POST/PATCH/DELETE calls never reached the store.
    assert [u["name"] for u in (await admin.call("GET", "/v1/service-users")).body["items"]] == ["root"]


async def test_bad_admin_credentials_are_401_with_the_matching_code(admin: Admin) -> None:
    directory = admin.gateway.directory
    garbage = await admin.call("GET", "/v1/roles", token="garbage")
    assert_error(garbage, 401, "invalid_token")
    assert garbage.headers["WWW-Authenticate"] == REALM_ERROR
    unknown = await admin.call("GET", "/v1/roles", token=tokens.generate())
    assert_error(unknown, 401, "invalid_token")
    assert unknown.headers["WWW-Authenticate"] == REALM_ERROR
    basic = await admin.call("GET", "/v1/roles", token=None, headers={"Authorization": "Basic cm9vdDpyb290"})
    assert_error(basic, 401, "invalid_token")

    _, old = await directory.create_token("root", "old", actor="test")
    assert (await admin.call("GET", "/v1/roles", token=old)).status == 200
    await directory.expire_token("root", "old", actor="test")
    await admin.gateway.changed("root")
    expired = await admin.call("GET", "/v1/roles", token=old)
    assert_error(expired, 401, "token_expired")
    assert re.fullmatch(r"token 'old' expired on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", expired.body["detail"])
    assert expired.headers["WWW-Authenticate"] == REALM_ERROR

    await directory.create_user("ops", actor="test", admin=True)
    _, ops = await directory.create_token("ops", "main", actor="test")
    await directory.update_user("ops", actor="test", disabled=True)
    assert_error(await admin.call("GET", "/v1/roles", token=ops), 401, "user_disabled")


async def test_a_service_token_is_403_and_bearer_is_case_insensitive(admin: Admin) -> None:
    service = (await issue(admin))["token"]
    forbidden = await admin.call("GET", "/v1/service-users", token=service)
    assert_error(forbidden, 403, "forbidden")
    assert forbidden.body["detail"] == "only admin identities may call the admin API"
    lower = await admin.call(
        "GET", "/v1/roles", token=None, headers={"Authorization": f"bearer {admin.token}"}
    )
    assert lower.status == 200
    # The admin token never passes the proxy.
    assert await admin.proxy_status(admin.token) == 403


async def test_two_authorization_headers_and_request_ids(admin: Admin) -> None:
    response = await admin.client.get(
        "/v1/roles",
        headers=[("Authorization", f"Bearer {admin.token}"), ("Authorization", f"Bearer {admin.token}")],
    )
    assert response.status == 400 and (await response.json())["error"] == "bad_request"
    mine = await admin.call("GET", "/v1/nowhere", headers={"X-Request-Id": "trace-123"})
    assert_error(mine, 404, "not_found")
    assert mine.headers["X-Request-Id"] == "trace-123"
    ok = await admin.call("GET", "/v1/roles")
    assert ok.status == 200 and ok.headers["X-Request-Id"]


async def _take_the_store_away(admin: Admin, store_url: str) -> None:
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        await admin.gateway.store.engine.dispose()
        database = Path(str(url.database))
        database.rename(database.with_suffix(".gone"))
        database.mkdir()  # a folder where the file was: SQLite cannot open it
        return
    dsn = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", url.database
        )
    finally:
        await connection.close()


async def _give_the_store_back(store_url: str) -> None:
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        database = Path(str(url.database))
        database.rmdir()
        database.with_suffix(".gone").rename(database)
        return
    dsn = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')
    finally:
        await connection.close()


async def test_store_down_is_503_and_recovers(admin: Admin, store_url: str) -> None:
    assert (await admin.call("GET", "/v1/service-users")).status == 200  # the admin identity is cached now
    await _take_the_store_away(admin, store_url)
    try:
        for method, path, body in (
            ("GET", "/v1/service-users", None),
            ("POST", "/v1/service-users", {"name": "late"}),
            ("GET", "/v1/audit-events", None),
        ):
            answer = await admin.call(method, path, json=body)
            assert_error(answer, 503, "store_unavailable")
        assert (await admin.call("GET", "/readyz", token=None)).status == 503
        # An uncached admin token cannot be checked either: 503, never a guess.
        assert_error(await admin.call("GET", "/v1/roles", token=tokens.generate()), 503, "store_unavailable")
    finally:
        await _give_the_store_back(store_url)
    for _ in range(100):
        if (await admin.call("GET", "/readyz", token=None)).status == 200:
            break
        await asyncio.sleep(0.05)
    assert (await admin.call("GET", "/v1/service-users")).status == 200
    gc.collect()  # SQLite connections that failed to open end their threads while the loop still runs
