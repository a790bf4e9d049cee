"""Real `gateway serve` processes: revocation across instances, no secret anywhere, the OpenAPI contract."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy.engine import make_url

from gateway.policy import RouteTable
from gateway.services import Directory
from gateway.store import open_store
from tests.conftest import IN_CI, write_config
from tests.process import REPO, GatewayProcess

POLL_SECONDS = 0.05
WITHIN_SECONDS = 1.0


async def admin_secret(store_url: str) -> str:
    """Create (and migrate) the store with an admin `root`; its token's secret."""
    store = await open_store(store_url)
    try:
        directory = Directory(store, lambda: RouteTable({}, ()))
        await directory.create_user("root", actor="test", admin=True)
        _, secret = await directory.create_token("root", "adm", actor="test")
    finally:
        await store.close()
    return secret


class AdminClient:
    """Calls one process's admin listener with the admin token."""

    def __init__(self, session: aiohttp.ClientSession, process: GatewayProcess, secret: str) -> None:
        self.session, self.base, self.headers = session, process.admin, {"Authorization": f"Bearer {secret}"}

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
            method, self.base + path, json=body, headers=self.headers
        ) as response:
            return response.status, (await response.json() if response.status != 204 else None)


async def proxy_status(session: aiohttp.ClientSession, process: GatewayProcess, secret: str) -> int:
    async with session.get(
        process.proxy + "/echo/a", headers={"Authorization": f"Bearer {secret}"}
    ) as response:
        await response.read()
        return response.status


async def delay_until_refused(session: aiohttp.ClientSession, process: GatewayProcess, secret: str) -> float:
    """Seconds until `process` refuses `secret`, polling every 50 ms (gives up after 3 s)."""
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        if await proxy_status(session, process, secret) == 401:
            return time.monotonic() - started
        await asyncio.sleep(POLL_SECONDS)
    return float("inf")


@pytest.fixture
async def pair(
    tmp_path: Path, store_url: str, upstream: TestServer
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, str]]:
    """Two `gateway serve` processes on one store, and the admin token's secret."""
    config = write_config(tmp_path, store_url=store_url, upstream_url=str(upstream.make_url("")).rstrip("/"))
    secret = await admin_secret(store_url)
    first, second = GatewayProcess(config), GatewayProcess(config)
    try:
        await asyncio.gather(first.wait_ready(), second.wait_ready())
        yield first, second, secret
    finally:
        first.stop()
        second.stop()


async def test_revocation_through_one_admin_api_reaches_the_other_process_within_a_second(
    pair: tuple[GatewayProcess, GatewayProcess, str], store_url: str
) -> None:
    first, second, secret = pair
    backend = make_url(store_url).get_backend_name()
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, first, secret)
        assert (await admin.call("POST", "/v1/service-users", {"name": "svc", "roles": ["writer"]}))[0] == 201
        status, expiring = await admin.call("POST", "/v1/service-users/svc/tokens", {"name": "a"})
        assert status == 201
        status, other = await admin.call("POST", "/v1/service-users/svc/tokens", {"name": "b"})
        assert status == 201
        for process in (first, second):  # both instances now hold both identities in their caches
            assert await proxy_status(session, process, expiring["token"]) == 200
            assert await proxy_status(session, process, other["token"]) == 200

        assert (await admin.call("POST", "/v1/service-users/svc/tokens/a/expire"))[0] == 200
        assert await proxy_status(session, first, expiring["token"]) == 401  # at once where it was made
        expire_delay = await delay_until_refused(session, second, expiring["token"])

        assert await proxy_status(session, second, other["token"]) == 200  # cached again after the eviction
        assert (await admin.call("PATCH", "/v1/service-users/svc", {"disabled": True}))[0] == 200
        assert await proxy_status(session, first, other["token"]) == 401
        disable_delay = await delay_until_refused(session, second, other["token"])

    report = f"revocation delay on {backend}: expire {expire_delay:.3f} s, disable {disable_delay:.3f} s"
    print(report)
    assert expire_delay <= WITHIN_SECONDS and disable_delay <= WITHIN_SECONDS, report


async def _store_text(store_url: str) -> bytes:
    """Everything the store holds, as bytes: the SQLite files, or every PostgreSQL row as text."""
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        database = Path(str(url.database))
        files = [database, *database.parent.glob(database.name + "-*")]
        return b"".join(path.read_bytes() for path in files if path.is_file())
    dsn = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    connection = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/" + str(url.database))
    try:
        tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert len(tables) >= 5
        dump: list[str] = []
        for row in tables:
            query = f'SELECT t::text AS line FROM "{row["tablename"]}" t'  # noqa: S608 -- names from pg_tables
            rows = await connection.fetch(query)
            dump.extend(record["line"] for record in rows)
        return "\n".join(dump).encode()
    finally:
        await connection.close()


async def test_no_secret_in_the_store_the_logs_or_the_audit(
    pair: tuple[GatewayProcess, GatewayProcess, str], store_url: str
) -> None:
    first, second, admin_token = pair
    secrets = [admin_token]
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(session, first, admin_token)
        await admin.call("POST", "/v1/service-users", {"name": "svc", "roles": ["writer"]})
        for name in ("a", "b", "c"):
            status, created = await admin.call("POST", "/v1/service-users/svc/tokens", {"name": name})
            assert status == 201
            secrets.append(created["token"])
        status, reset = await admin.call("POST", "/v1/service-users/svc/tokens/a/reset")
        assert status == 200
        secrets.append(reset["token"])
        for process in (first, second):
            for secret in secrets[1:]:
                await proxy_status(session, process, secret)
                await proxy_status(session, process, secret[:-1])  # a mistyped one, refused
        await admin.call("POST", "/v1/service-users/svc/tokens/b/expire")
        await admin.call("DELETE", "/v1/service-users/svc/tokens/c")
        texts = [
            (await admin.call("GET", "/v1/audit-events?limit=1000"))[1],
            (await admin.call("GET", "/v1/service-users/svc/tokens"))[1],
            (await admin.call("GET", "/v1/service-users"))[1],
        ]
    await asyncio.sleep(0.3)  # let both processes write their last log lines
    assert len(texts[0]["items"]) >= 8
    places = {
        "store": (await _store_text(store_url)).decode("latin-1"),
        "logs": first.logs() + second.logs(),
        "admin answers": repr(texts),
    }
    for where, text in places.items():
        for secret in secrets:
            # The whole secret, and its random middle (a hash or id may share the gw_ prefix).
            assert secret not in text and secret[8:40] not in text, f"a token secret is in the {where}"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_openapi_contract_with_schemathesis(
    tmp_path: Path, store_url: str, upstream: TestServer
) -> None:
    if importlib.util.find_spec("schemathesis") is None:
        # Part of the test extra: under CI a missing contract checker is a failure, not a skip.
        (pytest.fail if IN_CI else pytest.skip)("schemathesis is not installed (pip install '.[test]')")
    config = write_config(tmp_path, store_url=store_url, upstream_url=str(upstream.make_url("")).rstrip("/"))
    secret = await admin_secret(store_url)
    process = GatewayProcess(config)
    try:
        await process.wait_ready()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SCHEMATHESIS_HOOKS": "tests.admin.schemathesis_hooks",
            "GATEWAY_TEST_ADMIN": "root",
        }
        # One worker: with two threads, CPython 3.11.7's ast module (used by Hypothesis to describe
        # strategies) can fail with "AST constructor recursion depth mismatch".
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            process.admin + "/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",  # the store's rules (defined roles, real origins) are stricter
            "--header",
            f"Authorization: Bearer {secret}",
            "--max-examples",
            "30",
            "--workers",
            "1",
            "--generation-database",
            "none",
            # A fixed seed: the same cases every run, so a red run is our bug (a random one once
            # hit an internal IndexError of Hypothesis' target optimiser).
            "--seed",
            "20261201",
            "--no-color",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(run.communicate(), timeout=170)
        report = output.decode(errors="replace")
        print(report[-3000:])
        assert run.returncode == 0, report[-8000:]
        assert "Authentication failed" not in report, report[-4000:]
        async with aiohttp.ClientSession() as session:
            admin = AdminClient(session, process, secret)
            status, events = await admin.call("GET", "/v1/audit-events?limit=1000")
            assert status == 200  # the fuzzer never locked out the admin it ran as
            assert not [
                e for e in events["items"] if e["target"] == "user/root" and e["action"] != "user.created"
            ]
            assert len(events["items"]) > 10  # it did reach the success paths
        assert "admin request failed" not in process.logs()
        assert secret not in process.logs()
    finally:
        process.stop()
