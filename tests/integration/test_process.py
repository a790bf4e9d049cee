"""The real `gateway serve` process: JSON request log, SIGHUP reload, CLI changes, no secrets in logs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import DEFAULT_POLICIES, write_config
from tests.process import REPO, GatewayProcess, children_of


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def secret_from(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("Access token: ")]
    return line.removeprefix("Access token: ").strip()


@pytest.fixture
async def running(tmp_path: Path, upstream: TestServer) -> AsyncIterator[tuple[GatewayProcess, Path]]:
    config = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )
    assert cli(config, "user", "create", "logger", "--roles", "writer").returncode == 0
    process = GatewayProcess(config)
    try:
        await process.wait_ready()
        yield process, config
    finally:
        process.stop()


def log_lines(process: GatewayProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in process.logs().splitlines() if line.startswith("{")]


async def test_request_log_lines_and_no_secret_anywhere(running: tuple[GatewayProcess, Path]) -> None:
    process, config = running
    created = cli(config, "token", "set", "main", "--user", "logger")
    assert created.returncode == 0, created.stderr
    token = secret_from(created.stdout)
    async with aiohttp.ClientSession() as session:
        await asyncio.sleep(0.5)
        async with session.get(
            f"{process.proxy}/echo/a?secret-query=1", headers={"Authorization": f"Bearer {token}"}
        ) as ok:
            assert ok.status == 200
            request_id = ok.headers["X-Request-Id"]
        async with session.get(
            f"{process.proxy}/echo/a", headers={"Authorization": "Bearer " + token[:-1]}
        ) as bad:
            assert bad.status == 401
        async with session.get(f"{process.proxy}/nowhere") as missing:
            assert missing.status == 404
    lines: list[dict[str, object]] = []
    for _ in range(40):  # request lines are written in blocks, at least every second
        lines = [line for line in log_lines(process) if line.get("message") == "request"]
        if len(lines) >= 3:
            break
        await asyncio.sleep(0.1)
    by_id = {line["request_id"]: line for line in lines}
    granted = by_id[request_id]
    assert granted["method"] == "GET" and granted["path"] == "/echo/a"
    assert granted["route"] == "echo" and granted["user"] == "logger" and granted["status"] == 200
    assert isinstance(granted["duration_ms"], float)
    denied = [line for line in lines if line["status"] == 401]
    assert denied and denied[0]["error"] == "invalid_token" and denied[0]["user"] is None
    unrouted = [line for line in lines if line["status"] == 404]
    assert unrouted and unrouted[0]["route"] is None and unrouted[0]["error"] == "no_route"
    everything = process.logs()
    assert token not in everything and token[:-1] not in everything
    assert "secret-query" not in everything
    assert token.encode() not in (config.parent / "gateway.db").read_bytes()


async def test_cli_revocation_reaches_the_server_within_a_second(
    running: tuple[GatewayProcess, Path],
) -> None:
    process, config = running
    token = secret_from(cli(config, "token", "set", "short", "--user", "logger").stdout)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{process.proxy}/echo/a", headers=headers) as first:
            assert first.status == 200
        assert cli(config, "token", "expire", "short", "--user", "logger").returncode == 0
        await asyncio.sleep(1.0)
        async with session.get(f"{process.proxy}/echo/a", headers=headers) as after:
            assert after.status == 401
            assert (await after.json())["error"] == "token_expired"


async def test_sighup_reloads_and_keeps_the_old_version_when_bad(
    running: tuple[GatewayProcess, Path],
) -> None:
    process, config = running
    token = secret_from(cli(config, "token", "set", "hup", "--user", "logger").stdout)
    headers = {"Authorization": f"Bearer {token}"}
    policy = config.parent / "policies" / "policy.yaml"
    # Reader-only rules for GET: the writer role keeps access; then remove GET entirely.
    policy.write_text(DEFAULT_POLICIES.replace("methods: [GET, HEAD]", "methods: [HEAD]"))
    process.signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{process.proxy}/echo/a", headers=headers) as denied:
            assert denied.status == 403
        policy.write_text(DEFAULT_POLICIES + "\n  broken: [\n")
        process.signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        async with session.get(f"{process.proxy}/echo/a", headers=headers) as still:
            assert still.status == 403  # the previous (valid) version stays live
        async with session.head(f"{process.proxy}/echo/a", headers=headers) as head:
            assert head.status == 200
    refused = [line for line in log_lines(process) if "reload refused" in str(line.get("message"))]
    assert refused and "policy.yaml" in json.dumps(refused[0])
    assert process.process.poll() is None


async def test_workers_share_the_listener_and_all_see_revocation_and_reload(
    tmp_path: Path, upstream: TestServer
) -> None:
    config = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )
    assert cli(config, "user", "create", "multi", "--roles", "writer").returncode == 0
    token = secret_from(cli(config, "token", "set", "w", "--user", "multi").stdout)
    process = GatewayProcess(config, workers=2)
    try:
        await process.wait_ready()
        await asyncio.sleep(0.5)
        assert len(children_of(process.process.pid)) == 2
        headers = {"Authorization": f"Bearer {token}"}

        async def statuses(count: int) -> list[int]:
            found = []
            for _ in range(count):
                # A fresh connection each time, so both workers get some of them.
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"{process.proxy}/echo/a", headers=headers) as response:
                        found.append(response.status)
            return found

        assert set(await statuses(12)) == {200}
        policy = config.parent / "policies" / "policy.yaml"
        policy.write_text(DEFAULT_POLICIES.replace("methods: [GET, HEAD]", "methods: [HEAD]"))
        process.signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert set(await statuses(12)) == {403}
        assert cli(config, "user", "update", "multi", "--disable").returncode == 0
        await asyncio.sleep(1.0)
        assert set(await statuses(12)) == {401}
    finally:
        process.stop()
    assert process.process.returncode == 0
