"""Shutdown and drain on real `gateway serve` processes: /readyz 503 and `Connection: close` during
`shutdown.drain_delay`, then closed listeners and idle connections, requests in flight given
`shutdown.timeout`, what is left cut and logged "shutdown", a second signal exits 1, and
`--workers N` drains once on a signal to the whole process group."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import eventually, write_config
from tests.process import REPO, GatewayProcess, children_of, serving, writer_token
from tests.upstream import SEEN

STALLED = b"first chunk;"  # what the upstream's `?stall=S` sends at once; b"too late" follows after S s
CHUNK = b"u" * 65536


def drain_config(tmp_path: Path, upstream: TestServer, *, drain_delay: float, timeout: float) -> Path:
    """The test config with its own `shutdown` block (GatewayProcess then adds none)."""
    return write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        extra_yaml=f"shutdown: {{drain_delay: {drain_delay}, timeout: {timeout}}}\n",
    )


def log_lines(process: GatewayProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in process.logs().splitlines() if line.startswith("{")]


def access_lines(process: GatewayProcess, path: str) -> list[dict[str, object]]:
    """The access-log lines of requests for `path` (logged without its query)."""
    return [line for line in log_lines(process) if line.get("message") == "request" and line["path"] == path]


def messages(process: GatewayProcess, prefix: str) -> list[dict[str, object]]:
    return [line for line in log_lines(process) if str(line.get("message")).startswith(prefix)]


async def exit_of(process: GatewayProcess, since: float, within: float) -> tuple[int, float]:
    """The exit code of `process` and when it exited (seconds after `since`); fails after `within`
    seconds. Polls, so that the upstream in this event loop keeps serving meanwhile."""
    while process.process.poll() is None:
        if time.monotonic() - since > within:
            pytest.fail(f"the gateway still runs {within:g}s after the signal:\n{process.logs()}")
        await asyncio.sleep(0.02)
    return process.process.returncode, time.monotonic() - since


async def until_draining(session: aiohttp.ClientSession, process: GatewayProcess) -> None:
    """Poll /readyz until it answers 503 (the signal has been handled), at most 1 s."""

    async def draining() -> bool:
        async with session.get(process.admin + "/readyz") as response:
            await response.read()
            return response.status == 503

    await eventually(draining, within=1.0)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: gateway\r\n{auth}\r\n".encode()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a raw keep-alive connection; its status, headers (lower-case) and body."""
    writer.write(request)
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    status_line, *fields = head.rstrip("\r\n").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    if "content-length" in headers:
        return int(status_line.split()[1]), headers, await reader.readexactly(int(headers["content-length"]))
    assert headers.get("transfer-encoding") == "chunked", head
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")
    return int(status_line.split()[1]), headers, body


async def closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the other end closes (EOF or reset) within `within` seconds, sending nothing."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def refuses_new_connections(port: int, token: str) -> bool:
    """True when `port` refuses a connection, or closes it without answering a request."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except ConnectionRefusedError:
        return True
    try:
        writer.write(get("/strip/late", token))
        return await closed_by_peer(reader, within=1.0)
    finally:
        writer.close()


async def trickle(chunks: int, pause: float) -> AsyncIterator[bytes]:
    """An upload body sent over `chunks * pause` seconds."""
    for _ in range(chunks):
        yield CHUNK
        await asyncio.sleep(pause)


def upstream_saw(upstream: TestServer, path: str) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: the upstream has received a request for `path` (query aside)."""

    async def check() -> bool:
        return any(request.path == path for request in upstream.app[SEEN])

    return check


class GroupProcess(GatewayProcess):
    """A GatewayProcess leading its own process group, to be signalled as a whole like Ctrl-C,
    systemd or `tini -g` do (the same command and environment; only the session differs)."""

    def __init__(self, config: Path, *, workers: int) -> None:
        own_session = functools.partial(subprocess.Popen, start_new_session=True)
        with mock.patch.object(subprocess, "Popen", own_session):
            super().__init__(config, workers=workers)

    def signal_group(self, sig: signal.Signals) -> None:
        os.killpg(self.process.pid, sig)

    def stop(self) -> None:
        if self.process.poll() is None:  # a failed test: the group is still ours, end all of it
            os.killpg(self.process.pid, signal.SIGKILL)
        super().stop()


async def workers_serving(process: GatewayProcess, workers: int) -> None:
    """Wait until every worker has logged "gateway serving" (its drain signal handler is set)."""

    async def all_serving() -> bool:
        return {line["worker"] for line in messages(process, "gateway serving")} == set(range(workers))

    await eventually(all_serving, within=20.0)


@contextlib.asynccontextmanager
async def group_serving(config: Path, workers: int) -> AsyncIterator[tuple[GroupProcess, str]]:
    """`serving`, with the gateway in its own process group and every worker up."""
    token = await writer_token(config)
    process = GroupProcess(config, workers=workers)
    try:
        await process.wait_ready()
        await workers_serving(process, workers)
        yield process, token
    finally:
        process.stop()


# --- requests in flight finish ----------------------------------------------------------------


async def test_downloads_in_flight_finish_whole_within_drain_delay_plus_timeout(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay, timeout = 1.0, 4.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    size, piece, pause = 32 * 2**20, 2**20, 0.08  # read in about 2.6 s: past drain_delay
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        stalled = await session.get(f"{process.proxy}/strip/stalled?stall=3", headers=bearer(token))
        assert stalled.status == 200
        assert await stalled.content.readexactly(len(STALLED)) == STALLED
        slow = await session.get(f"{process.proxy}/strip/slow?bytes={size}", headers=bearer(token))
        assert slow.status == 200
        received = len(await slow.content.readexactly(piece))
        sent = time.monotonic()
        process.signal(signal.SIGTERM)

        while chunk := await slow.content.read(piece):  # a slow reader: the gateway waits on it
            received += len(chunk)
            await asyncio.sleep(pause)
        assert received == size
        assert time.monotonic() - sent > drain_delay + 0.5  # it ran well past the listeners' closing
        assert await stalled.read() == b"too late"
        finished = time.monotonic() - sent
        assert finished > drain_delay + 1.0

        code, exited = await exit_of(process, sent, within=drain_delay + timeout + 3)
        assert code == 0
        # The process leaves once they are done, not at the end of the timeout.
        assert exited < finished + 1.0 < drain_delay + timeout
        for path in ("/strip/stalled", "/strip/slow"):
            (line,) = access_lines(process, path)
            assert line["status"] == 200 and line["error"] is None and line["user"] == "svc"
        assert not messages(process, "shutdown timeout reached")


async def test_an_upload_in_flight_finishes_within_drain_delay_plus_timeout(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay, timeout = 0.5, 3.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    chunks, pause = 10, 0.2  # the body arrives over about 2 s: past drain_delay
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        upload = asyncio.ensure_future(
            session.post(f"{process.proxy}/strip/upload", data=trickle(chunks, pause), headers=bearer(token))
        )
        await eventually(upstream_saw(upstream, "/upload"))
        sent = time.monotonic()
        process.signal(signal.SIGTERM)

        uploaded = await asyncio.wait_for(upload, drain_delay + timeout + 3)
        assert uploaded.status == 200
        echo = await uploaded.json()
        assert echo["body_bytes"] == chunks * len(CHUNK)
        assert echo["body_sha256"] == hashlib.sha256(CHUNK * chunks).hexdigest()
        code, exited = await exit_of(process, sent, within=drain_delay + timeout + 3)
        assert code == 0 and exited < drain_delay + timeout
        (line,) = access_lines(process, "/strip/upload")
        assert line["status"] == 200 and line["error"] is None


# --- during drain_delay -----------------------------------------------------------------------


async def test_during_drain_delay_readyz_is_503_and_both_listeners_serve_with_connection_close(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay = 3.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=1)
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        reader, writer = await asyncio.open_connection("127.0.0.1", process.proxy_port)
        try:
            status, headers, _ = await exchange(reader, writer, get("/strip/before", token))
            assert status == 200 and headers.get("connection", "").lower() != "close"
            sent = time.monotonic()
            process.signal(signal.SIGTERM)

            await until_draining(session, process)
            assert time.monotonic() - sent < 1.0  # at once
            async with session.get(process.admin + "/readyz") as ready:
                assert ready.status == 503 and (await ready.json())["status"] == "draining"
                assert ready.headers.get("Connection", "").lower() == "close"

            # A keep-alive connection opened before the signal: answered, then closed.
            status, headers, _ = await exchange(reader, writer, get("/strip/again", token))
            assert status == 200 and headers.get("connection", "").lower() == "close"
            assert await closed_by_peer(reader, within=1.0)
        finally:
            writer.close()
        # A new proxy connection: served, with `Connection: close`.
        async with session.get(f"{process.proxy}/strip/during", headers=bearer(token)) as during:
            assert during.status == 200
            assert during.headers.get("Connection", "").lower() == "close"
            assert (await during.json())["raw_path"] == "/during"
        # The admin listener too.
        async with session.get(f"{process.admin}/healthz") as health:
            assert health.status == 200 and (await health.json())["status"] == "ok"
            assert health.headers.get("Connection", "").lower() == "close"
        assert time.monotonic() - sent < drain_delay  # all of it within the delay

        code, exited = await exit_of(process, sent, within=drain_delay + 3)
        assert code == 0
        assert drain_delay - 0.1 <= exited < drain_delay + 1.5
        (draining,) = messages(process, "draining")
        assert draining["drain_delay"] == drain_delay


async def test_an_answer_given_during_drain_delay_to_an_earlier_request_says_connection_close(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay = 2.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=1)
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(
            session.get(f"{process.proxy}/strip/pending?delay=1", headers=bearer(token))
        )
        await eventually(upstream_saw(upstream, "/pending"))
        sent = time.monotonic()
        process.signal(signal.SIGTERM)
        await until_draining(session, process)
        response = await asyncio.wait_for(pending, 5)
        assert time.monotonic() - sent < drain_delay  # answered during the delay
        assert response.status == 200
        await response.read()
        assert response.headers.get("Connection", "").lower() == "close"


# --- after drain_delay ------------------------------------------------------------------------


async def test_idle_keepalive_connections_close_right_after_drain_delay_and_the_process_exits(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay, timeout = 1.0, 10.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    async with serving(config) as (process, token):
        proxy = await asyncio.open_connection("127.0.0.1", process.proxy_port)
        admin = await asyncio.open_connection("127.0.0.1", process.admin_port)
        try:
            assert (await exchange(*proxy, get("/strip/idle", token)))[0] == 200
            assert (await exchange(*admin, get("/healthz")))[0] == 200
            sent = time.monotonic()
            process.signal(signal.SIGTERM)
            for reader, _ in (proxy, admin):
                assert await closed_by_peer(reader, within=drain_delay + 2)
                # Open through drain_delay, closed right after it (not held until `timeout`).
                assert drain_delay - 0.1 <= time.monotonic() - sent < drain_delay + 1.0
        finally:
            proxy[1].close()
            admin[1].close()
        code, exited = await exit_of(process, sent, within=drain_delay + 3)
        assert code == 0 and exited < drain_delay + 1.5
        assert not messages(process, "shutdown timeout reached")


async def test_a_connection_accepted_before_the_listener_closed_gets_its_first_request_answered(
    tmp_path: Path, upstream: TestServer
) -> None:
    # A proxy in front opens a connection and sends its request: if the drain closed it as
    # "idle" before reading it all, the request would be reset after it was sent (nginx retries
    # no POST). The head's first line goes first, so the gateway has surely accepted the
    # connection when the signal comes (one still in the kernel's queue is another matter).
    drain_delay, timeout = 1.0, 5.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    async with serving(config) as (process, token):
        reader, writer = await asyncio.open_connection("127.0.0.1", process.proxy_port)
        try:
            writer.write(b"POST /strip/late HTTP/1.1\r\n")
            await writer.drain()
            await asyncio.sleep(0.3)
            process.signal(signal.SIGTERM)
            await asyncio.sleep(drain_delay + 0.5)  # the listener is closed, idle connections too
            rest = f"Host: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 2\r\n\r\nok"
            status, headers, _ = await exchange(reader, writer, rest.encode())
            assert status == 200
            assert headers.get("connection", "").lower() == "close"
        finally:
            writer.close()
        code, _ = await exit_of(process, time.monotonic(), within=timeout + 3)
        assert code == 0


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(1, id="one-process"),
        pytest.param(2, id="workers"),
    ],
)
async def test_after_drain_delay_new_connections_are_refused_while_a_request_finishes(
    tmp_path: Path, upstream: TestServer, workers: int
) -> None:
    drain_delay, timeout = 1.0, 5.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    async with group_serving(config, workers) as (process, token), aiohttp.ClientSession() as session:
        download = await session.get(f"{process.proxy}/strip/slow?stall=3.5", headers=bearer(token))
        assert await download.content.readexactly(len(STALLED)) == STALLED
        sent = time.monotonic()
        process.signal(signal.SIGTERM)
        await asyncio.sleep(drain_delay + 0.5)
        proxy_refuses = await refuses_new_connections(process.proxy_port, token)
        admin_refuses = await refuses_new_connections(process.admin_port, token)
        assert await download.read() == b"too late"  # while the one in flight finishes
        assert proxy_refuses, "a new proxy connection after drain_delay was accepted and left hanging"
        assert admin_refuses, "a new admin connection after drain_delay was accepted and left hanging"
        code, _ = await exit_of(process, sent, within=drain_delay + timeout + 3)
        assert code == 0


# --- what is left at the timeout is cut -------------------------------------------------------


async def test_requests_still_running_at_the_timeout_are_cut_and_logged_once_as_shutdown(
    tmp_path: Path, upstream: TestServer
) -> None:
    drain_delay, timeout = 0.5, 1.5
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        download = await session.get(f"{process.proxy}/strip/cut-download?stall=30", headers=bearer(token))
        assert download.status == 200
        assert await download.content.readexactly(len(STALLED)) == STALLED
        upload = asyncio.ensure_future(
            session.post(f"{process.proxy}/strip/cut-upload", data=trickle(200, 0.1), headers=bearer(token))
        )
        await eventually(upstream_saw(upstream, "/cut-upload"))
        sent = time.monotonic()
        process.signal(signal.SIGTERM)

        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(download.read(), drain_delay + timeout + 3)
        cut = time.monotonic() - sent
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(upload, 3)
        assert drain_delay + timeout - 0.1 <= cut < drain_delay + timeout + 1.0

        code, exited = await exit_of(process, sent, within=drain_delay + timeout + 3)
        assert code == 0 and exited < drain_delay + timeout + 1.5
        (download_line,) = access_lines(process, "/strip/cut-download")
        assert download_line["error"] == "shutdown"
        assert download_line["route"] == "strip" and download_line["user"] == "svc"
        assert download_line["status"] == 200 and download_line["upstream_status"] == 200
        (upload_line,) = access_lines(process, "/strip/cut-upload")
        assert upload_line["error"] == "shutdown"
        assert upload_line["route"] == "strip" and upload_line["user"] == "svc"
        (warning,) = messages(process, "shutdown timeout reached")
        assert warning["connections"] == 2
        assert token not in process.logs()


# --- a second signal --------------------------------------------------------------------------


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
async def test_a_second_signal_during_drain_exits_at_once_with_1(
    tmp_path: Path, upstream: TestServer, workers: int, second: signal.Signals
) -> None:
    drain_delay = 5.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=5)
    async with group_serving(config, workers) as (process, token), aiohttp.ClientSession() as session:
        pids = [int(str(line["pid"])) for line in messages(process, "supervising workers")]
        worker_pids = children_of(pids[0]) if pids else []
        assert len(worker_pids) == (workers if workers > 1 else 0)
        sent = time.monotonic()
        process.signal_group(signal.SIGTERM)  # to the whole group: workers ignore it
        await until_draining(session, process)
        process.signal_group(second)
        code, exited = await exit_of(process, sent, within=drain_delay)
        assert code == 1
        assert exited < 2.0  # well before drain_delay would end
        assert len(messages(process, "second stop signal")) == 1
        # No worker outlives its parent.
        await asyncio.sleep(0.3)
        assert [pid for pid in worker_pids if alive(pid)] == []


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# --- workers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_workers_drain_once_on_a_signal_to_the_whole_process_group(
    tmp_path: Path, upstream: TestServer, sig: signal.Signals
) -> None:
    drain_delay, timeout = 1.0, 2.0
    config = drain_config(tmp_path, upstream, drain_delay=drain_delay, timeout=timeout)
    async with group_serving(config, 2) as (process, token), aiohttp.ClientSession() as session:
        finishing = await session.get(f"{process.proxy}/strip/finishing?stall=2", headers=bearer(token))
        assert await finishing.content.readexactly(len(STALLED)) == STALLED
        # A second connection (the first is busy), so possibly the other worker.
        cut = await session.get(f"{process.proxy}/strip/cut?stall=30", headers=bearer(token))
        assert await cut.content.readexactly(len(STALLED)) == STALLED
        sent = time.monotonic()
        process.signal_group(sig)  # parent and workers alike, as Ctrl-C or systemd do

        assert await finishing.read() == b"too late"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(cut.read(), drain_delay + timeout + 3)
        code, exited = await exit_of(process, sent, within=drain_delay + timeout + 3)
        assert code == 0 and exited < drain_delay + timeout + 1.5

        draining = collections.Counter(line["worker"] for line in messages(process, "draining"))
        assert draining == {0: 1, 1: 1}
        stopped = collections.Counter(line["worker"] for line in messages(process, "stopped"))
        assert stopped == {0: 1, 1: 1}
        assert not messages(process, "second stop signal") and not messages(process, "worker died")
        (finished,) = access_lines(process, "/strip/finishing")
        assert finished["status"] == 200 and finished["error"] is None
        (logged,) = access_lines(process, "/strip/cut")
        assert logged["error"] == "shutdown" and logged["route"] == "strip" and logged["user"] == "svc"
        assert token not in process.logs()


# --- configuration ----------------------------------------------------------------------------


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("block", "where", "message"),
    [
        ("shutdown: {drain_delay: -1}\n", "drain_delay", "shutdown.drain_delay: must be a number ≥ 0"),
        (
            "shutdown:\n  drain_delay: 1\n  timeout: x\n",
            "timeout",
            "shutdown.timeout: must be a number ≥ 0, not a string",
        ),
        (
            "shutdown:\n  timeout: 3\n  grace: 2\n",
            "grace",
            "shutdown.grace: unknown key; expected one of: drain_delay, timeout",
        ),
    ],
)
def test_bad_shutdown_settings_fail_check_at_their_line(
    tmp_path: Path, block: str, where: str, message: str
) -> None:
    config = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url="http://127.0.0.1:9",
        extra_yaml=block,
    )
    lines = config.read_text().splitlines()
    block_starts = next(number for number, text in enumerate(lines, 1) if text.startswith("shutdown:"))
    line = next(n for n, text in enumerate(lines, 1) if n >= block_starts and f"{where}:" in text)
    result = check(config)
    assert result.returncode == 1
    assert f"error: {config}:{line}: {message}" in result.stderr.splitlines()


def test_zero_drain_delay_and_timeout_are_valid(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url="http://127.0.0.1:9",
        extra_yaml="shutdown:\n  drain_delay: 0\n  timeout: 0\n",
    )
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
