"""Shared fixtures: a real upstream, real stores (SQLite file and PostgreSQL), the real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from aiohttp.web import ServerRunner
from yarl import URL

from gateway.app import Gateway, build_proxy_server
from gateway.config import load_config
from gateway.services import Directory
from tests.upstream import build_upstream

PG_ADMIN_DSN = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI") == "true"


# Changes reach every instance within 1 s (README "Freshness"); tests wait for that, with
# slack for a loaded machine, by polling the condition rather than sleeping a fixed time.
FRESHNESS_SECONDS = 1.0


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 2 * FRESHNESS_SECONDS) -> None:
    """Poll `check` until it holds; fail the test when it does not within `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {within:g}s")
        await asyncio.sleep(0.02)


def pg_unavailable(reason: str) -> None:
    """Fail under CI (PostgreSQL is part of the test matrix there), skip elsewhere."""
    message = f"PostgreSQL at {PG_ADMIN_DSN} is needed: {reason}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


REDIS_HOST = "127.0.0.1:6379"
# One database of its own per test run (tests of one run go one at a time); another run beside
# this one sets GATEWAY_TEST_REDIS_DB to another number.
REDIS_DATABASE = int(os.environ.get("GATEWAY_TEST_REDIS_DB", "15"))


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A redis:// URL of a database of the real Redis, empty before and after the test.

    Missing Redis fails under CI (the shared counters are a real-part feature), skips elsewhere.
    """
    import redis.asyncio as redis_client
    from redis.exceptions import RedisError

    url = f"redis://{REDIS_HOST}/{REDIS_DATABASE}"
    client = redis_client.Redis.from_url(url, socket_timeout=5)
    try:
        await client.flushdb()
    except (RedisError, OSError) as exc:
        await client.aclose()
        message = f"Redis at {REDIS_HOST} is needed: {type(exc).__name__}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield url
    finally:
        with contextlib.suppress(RedisError, OSError):
            await client.flushdb()
        await client.aclose()


async def create_pg_database() -> str:
    """Create a new, empty database on the real PostgreSQL; return its SQLAlchemy URL."""
    name = "gw_" + secrets.token_hex(6)
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pg_unavailable(f"{type(exc).__name__}: {exc}")
        raise
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_pg_database(url: str) -> None:
    """Drop the database `create_pg_database` made."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new, empty database on the real PostgreSQL (its SQLAlchemy URL), dropped afterwards."""
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty store: a SQLite file, or a new database on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """A real aiohttp upstream on loopback (see tests/upstream.py)."""
    server = TestServer(build_upstream(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


DEFAULT_POLICIES = """
roles:
  service-user-project-admin:
    description: Every permission
    permissions: ["*"]
  reader:
    permissions: ["echo:read"]
  writer:
    includes: [reader]
    permissions: ["echo:write"]
  other:
    permissions: ["other:read"]
routes:
  echo:
    rules:
      - methods: [POST]
        paths: ["/echo/hook"]
        public: true
      - methods: [GET, HEAD]
        paths: ["/echo/**"]
        require: "echo:read"
      - methods: [POST, PUT, PATCH, DELETE]
        paths: ["/echo/**"]
        require: "echo:write"
  deep:
    rules:
      - paths: ["/echo/deep/**"]
        require: "other:read"
  strip:
    rules:
      - paths: ["/strip/**"]
        require: "echo:read"
  browser:
    rules:
      - methods: [POST]
        paths: ["/app/public"]
        public: true
      - paths: ["/app/**"]
        require: "echo:read"
"""


class ProxyTestServer(BaseTestServer):
    """The gateway's proxy listener on a free loopback port, built exactly as `gateway serve` builds it.

    (aiohttp's RawTestServer drops the server arguments given to it, and adds its own
    `handler_cancellation`: a test on it would not run the production server.)
    """

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(host="127.0.0.1", **kwargs)
        self._gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> ServerRunner:
        return ServerRunner(build_proxy_server(self._gateway, access_log=None))


def proxy_test_server(gateway: Gateway, **kwargs: Any) -> ProxyTestServer:
    """The gateway's proxy listener on a free loopback port, as `gateway serve` builds it."""
    return ProxyTestServer(gateway, **kwargs)


def write_config(
    directory: Path,
    *,
    store_url: str,
    upstream_url: str,
    extra_yaml: str = "",
    policies: str = DEFAULT_POLICIES,
    route_options: str = "",
) -> Path:
    """Write gateway.yaml and policies/ into `directory`; return the config path."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "policy.yaml").write_text(textwrap.dedent(policies))
    config = directory / "gateway.yaml"
    options = "".join(f"    {line}\n" for line in textwrap.dedent(route_options).splitlines() if line.strip())
    config.write_text(
        "listeners:\n"
        '  proxy: "127.0.0.1:0"\n'
        '  admin: "127.0.0.1:0"\n'
        f'store:\n  url: "{store_url}"\n'
        "routes:\n"
        f'  - name: echo\n    prefix: /echo\n    upstream: "{upstream_url}"\n    timeout: 2\n{options}'
        f'  - name: deep\n    prefix: /echo/deep\n    upstream: "{upstream_url}"\n'
        f'  - name: strip\n    prefix: /strip\n    upstream: "{upstream_url}"\n    strip_prefix: true\n'
        f'  - name: browser\n    prefix: /app\n    upstream: "{upstream_url}"\n'
        "    cors:\n"
        '      origins: {store: true, extra: ["http://fixed.example:8000"]}\n'
        "      allow_headers: [Authorization, Content-Type]\n"
        "      expose_headers: [X-Request-Id]\n"
        "      max_age: 600\n" + textwrap.dedent(extra_yaml)
    )
    return config


@dataclass
class Harness:
    """A running gateway (in this process) with a client on its proxy app."""

    gateway: Gateway
    client: TestClient
    directory: Directory
    upstream_app: web.Application

    def url(self, path: str) -> URL:
        """An absolute URL to the proxy that the client sends exactly as written (no normalising)."""
        return URL(f"http://127.0.0.1:{self.client.port}{path}", encoded=True)

    async def send(self, method: str, path: str, **kwargs: Any) -> ClientResponse:
        """Send `path` byte for byte (dot segments and escapes intact)."""
        return await self.client.session.request(method, self.url(path), **kwargs)

    async def settle(self) -> None:
        """Let the gateway apply store changes made by `directory` (another process, in effect)."""
        await self.gateway.catch_up()

    async def token(
        self, user: str = "svc", *, roles: list[str] | None = None, token_roles: list[str] | None = None
    ) -> str:
        """Create `user` (if needed) and a fresh token for it; return the secret."""
        existing = {u.name for u in await self.directory.list_users()}
        if user not in existing:
            await self.directory.create_user(user, actor="test", roles=roles or ["writer"])
        count = len(await self.directory.list_tokens(user))
        _, secret = await self.directory.create_token(user, f"t{count}", actor="test", roles=token_roles)
        return secret


@pytest.fixture
async def make_harness(
    tmp_path: Path, store_url: str, upstream: TestServer
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Factory: start the real gateway on a config written for the real upstream and store."""
    started: list[tuple[Gateway, TestClient]] = []

    async def make(**options: str) -> Harness:
        path = write_config(
            tmp_path, store_url=store_url, upstream_url=str(upstream.make_url("")).rstrip("/"), **options
        )
        config = load_config(path, env={})
        gateway = await Gateway.open(config)
        client = TestClient(proxy_test_server(gateway))
        await client.start_server()
        started.append((gateway, client))
        directory = Directory(gateway.store, lambda: gateway.pipeline.settings.table)
        return Harness(gateway, client, directory, upstream.app)

    yield make
    for gateway, client in started:
        await client.close()
        await gateway.close()


@pytest.fixture
async def harness(make_harness: Callable[..., Awaitable[Harness]]) -> Harness:
    """The default gateway: routes echo (/echo), deep (/echo/deep), strip (/strip)."""
    return await make_harness()
