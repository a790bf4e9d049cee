"""The listeners of a real `gateway serve` process: parser refusals, Server header, descriptor limits.

Run as a subprocess (uvloop, the production server wiring, logs on stderr), so what an
operator sees is what is checked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import write_config
from tests.process import GatewayProcess, serving, writer_token


@pytest.fixture
async def config_path(tmp_path: Path, upstream: TestServer) -> Path:
    return write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )


@pytest.fixture
async def served(config_path: Path) -> AsyncIterator[tuple[GatewayProcess, str]]:
    async with serving(config_path) as running:
        yield running


async def _raw(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_parser_refusals_on_both_listeners_are_json_and_never_quote_the_token(
    served: tuple[GatewayProcess, str],
) -> None:
    process, token = served
    raw = (
        b"GET /v1/service-users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\x01\r\n\r\n"
    )
    for port in (process.proxy_port, process.admin_port):
        answer = await _raw(port, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"400", answer[:200]
        assert token.encode() not in answer
        assert json.loads(body)["error"] == "bad_request"
        assert b"x-request-id" in head.lower()
        assert b"python" not in head.lower() and b"aiohttp" not in head.lower()
    await asyncio.sleep(1.5)  # the request log is flushed every second
    logs = process.logs()
    assert token not in logs
    refusals = [json.loads(line) for line in logs.splitlines() if '"status":400' in line]
    assert refusals and refusals[0]["error"] == "bad_request", logs[-2000:]
    admin = [json.loads(line) for line in logs.splitlines() if "admin request refused" in line]
    assert [(line["status"], line["error"]) for line in admin] == [(400, "bad_request")], logs[-2000:]


async def test_admin_answers_carry_no_server_version(served: tuple[GatewayProcess, str]) -> None:
    process, _ = served
    async with aiohttp.ClientSession() as session:
        for url in (process.admin + "/healthz", process.admin + "/v1/roles", process.proxy + "/nowhere"):
            async with session.get(url) as response:
                server = response.headers.get("Server", "")
                assert "python" not in server.lower() and "aiohttp" not in server.lower(), (url, server)


async def test_descriptor_limit_caps_connections_and_keeps_the_admin_listener_up(config_path: Path) -> None:
    """ulimit -n 200: 300 idle client sockets must not make the process deaf; the cap is logged."""
    token = await writer_token(config_path)
    process = GatewayProcess(config_path, open_files=200)
    held: list[asyncio.StreamWriter] = []
    try:
        await process.wait_ready()
        for _ in range(300):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", process.proxy_port)
            except OSError:
                break
            held.append(writer)
        async with aiohttp.ClientSession() as session:
            async with session.get(process.admin + "/healthz") as response:
                assert response.status == 200
            for writer in held:
                writer.close()
            held.clear()
            await asyncio.sleep(0.5)
            async with session.get(
                process.proxy + "/echo/a", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 200
        logs = process.logs()
        assert "limits.max_connections lowered to fit the open-file limit" in logs
        assert "refusing client connections: limits.max_connections reached" in logs
    finally:
        for writer in held:
            writer.close()
        process.stop()
