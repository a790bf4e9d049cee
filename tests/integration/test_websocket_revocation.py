"""Revocation reaches open WebSockets (CONTRACT "WebSocket"), on real `gateway serve` processes.

A credential reset, expired (by command or by its `expires_at`) or deleted, a user disabled,
deleted or left without the permission, and a reloaded policy that stops granting it: the
gateway closes the socket within 1 s with 1008 towards the client and closes the upstream
side, on every instance sharing the store. A socket whose instance has not read the store's
changes for longer than `cache.outage_grace` is closed with 1013; SIGTERM gives 1001 after
the drain delay. The socket's access line (status 101) says how it ended and never holds the
token.

The upstream is a real aiohttp WebSocket server in this event loop that records when its
side of each socket closes. Every CLI call runs as an asyncio subprocess, so that upstream
and the clients keep running (and time-stamping) while the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web
from sqlalchemy.engine import make_url

from gateway.config import load_config
from gateway.decision import build_settings
from gateway.services import Directory
from gateway.store import Store, open_store
from tests.conftest import DEFAULT_POLICIES, PG_ADMIN_DSN, fresh_pg_database, write_config
from tests.process import REPO, GatewayProcess

# One event loop for the module: the upstream, the pair of processes and the bystander
# sockets live across the tests.
pytestmark = pytest.mark.asyncio(loop_scope="module")

WITHIN = 1.0  # seconds: the contract's bound from the change to the close
WAIT = 4.0  # seconds the tests wait for something before they report what happened
POLICY = 1008
TRY_AGAIN = 1013
GOING_AWAY = 1001


# -- the upstream --------------------------------------------------------------------


@dataclass
class UpstreamSide:
    """The upstream's side of one socket: when it closed and with which code."""

    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None  # time.monotonic()
    code: int | None = None


class WsUpstream:
    """A real WebSocket upstream on loopback: echoes text as "echo:<text>" on /echo/ws/{name},
    accepts the subprotocol "chat", and records each socket's end by name."""

    def __init__(self) -> None:
        self.sides: dict[str, UpstreamSide] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/echo/ws/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        name = request.match_info["name"]
        side = self.sides[name] = UpstreamSide()
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await ws.send_str("echo:" + message.data)
        finally:
            side.closed_at = time.monotonic()
            side.code = ws.close_code
            side.closed.set()
        return ws

    async def closed_at(self, name: str) -> float:
        """When the upstream side of socket `name` closed (time.monotonic()); fails when it is
        still open WAIT seconds from now."""
        side = self.sides[name]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(side.closed.wait(), WAIT)
        if side.closed_at is None:
            pytest.fail(f"the upstream side of socket {name!r} is still open")
        return side.closed_at


# -- the clients -----------------------------------------------------------------------


@dataclass
class Client:
    """One client WebSocket through the gateway; a reader task records texts and the close."""

    name: str
    ws: aiohttp.ClientWebSocketResponse
    texts: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    closed_at: float | None = None  # time.monotonic()
    closed_wall: float | None = None  # time.time()
    code: int | None = None
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message.type is WSMsgType.TEXT:
                    self.texts.put_nowait(message.data)
                    continue
                if message.type in (WSMsgType.PING, WSMsgType.PONG, WSMsgType.BINARY):
                    continue
                self.closed_at, self.closed_wall = time.monotonic(), time.time()
                self.code = message.data if message.type is WSMsgType.CLOSE else self.ws.close_code
                return
        finally:
            self.closed.set()

    async def echo(self, text: str) -> None:
        """Send `text` and assert its echo comes back through the gateway."""
        assert not self.closed.is_set(), f"socket {self.name!r} closed with {self.code}"
        await self.ws.send_str(text)
        assert await asyncio.wait_for(self.texts.get(), WAIT) == "echo:" + text

    async def wait_closed(self) -> float:
        """When this socket closed (time.monotonic()); fails when it is still open after WAIT s."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), WAIT)
        if self.closed_at is None:
            pytest.fail(f"socket {self.name!r} is still open {WAIT:g}s later")
        return self.closed_at

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, 2)


async def connect(
    session: aiohttp.ClientSession,
    process: GatewayProcess,
    name: str,
    token: str,
    *,
    subprotocol: bool = False,
) -> Client:
    """Open /echo/ws/{name} through `process`: the token as `Authorization: Bearer`, or (with
    `subprotocol`) as a `bearer.<token>` entry beside the real subprotocol "chat"."""
    url = f"{process.proxy}/echo/ws/{name}"
    if subprotocol:
        ws = await session.ws_connect(url, protocols=("chat", f"bearer.{token}"), autoping=True)
        assert ws.protocol == "chat"
    else:
        ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token}"}, autoping=True)
    client = Client(name, ws)
    client.reader = asyncio.create_task(client._read())
    await client.echo("hello")
    return client


# -- processes, CLI, logs -------------------------------------------------------------


async def cli(config: Path, *args: str) -> tuple[float, str]:
    """Run `gateway --config CONFIG ARGS...` without blocking this event loop; (time.monotonic()
    when it returned, its stdout). Fails on a non-zero exit."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=config.parent,
        env=env,
    )
    out, err = await asyncio.wait_for(run.communicate(), 60)
    returned = time.monotonic()
    assert run.returncode == 0, f"gateway {' '.join(args)}: exit {run.returncode}\n{err.decode()}"
    return returned, out.decode()


def secret_from(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("Access token: ")]
    return line.removeprefix("Access token: ").strip()


def access_lines(process: GatewayProcess, path: str) -> list[dict[str, object]]:
    """The access-log lines (logger gateway.access) of `path` so far."""
    lines = [json.loads(line) for line in process.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "gateway.access" and line.get("path") == path]


async def access_line(process: GatewayProcess, path: str) -> dict[str, object]:
    """The one access line of `path`, waiting for it (lines are written in blocks, every second)."""
    deadline = time.monotonic() + WAIT
    while not (found := access_lines(process, path)):
        if time.monotonic() > deadline:
            pytest.fail(f"no access line for {path} after {WAIT:g}s:\n{process.logs()[-4000:]}")
        await asyncio.sleep(0.1)
    assert len(found) == 1, found
    return found[0]


async def open_directory(config: Path) -> tuple[Store, Directory]:
    """The store of `config` (created and migrated) and a Directory on it, with its policies."""
    table = build_settings(load_config(config, env={})).table
    store = await open_store(load_config(config, env={}).store_url)
    return store, Directory(store, lambda: table)


async def new_user(directory: Directory, user: str, *tokens: str, role: str = "writer") -> list[str]:
    """Create `user` with `role` and one token per name; their secrets."""
    await directory.create_user(user, actor="test", roles=[role])
    return [(await directory.create_token(user, name, actor="test"))[1] for name in tokens]


def ws_config(directory: Path, store_url: str, upstream: WsUpstream, extra_yaml: str = "") -> Path:
    return write_config(
        directory,
        store_url=store_url,
        upstream_url=upstream.url,
        extra_yaml=extra_yaml,
        route_options="websocket: true",
    )


@contextlib.asynccontextmanager
async def serving(config: Path) -> AsyncIterator[GatewayProcess]:
    process = GatewayProcess(config)
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


# -- fixtures -------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstream() -> AsyncIterator[WsUpstream]:
    server = WsUpstream()
    await server.start()
    yield server
    await server.close()


@dataclass
class Pair:
    """Two `gateway serve` processes on one PostgreSQL database, and a Directory on it."""

    config: Path
    first: GatewayProcess
    second: GatewayProcess
    directory: Directory
    session: aiohttp.ClientSession
    bystanders: list[Client]

    async def bystanders_unaffected(self) -> None:
        """The sockets of another user, opened before any test, are open and still echo."""
        for client in self.bystanders:
            await client.echo(f"still-there-{time.monotonic()}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory, upstream: WsUpstream) -> AsyncIterator[Pair]:
    async with fresh_pg_database() as url:
        config = ws_config(tmp_path_factory.mktemp("pair"), url, upstream)
        store, directory = await open_directory(config)
        (bystander,) = await new_user(directory, "bystander", "main")
        first, second = GatewayProcess(config), GatewayProcess(config)
        session = aiohttp.ClientSession()
        bystanders: list[Client] = []
        try:
            await asyncio.gather(first.wait_ready(), second.wait_ready())
            bystanders = [
                await connect(session, first, "bystander-first", bystander),
                await connect(session, second, "bystander-second", bystander, subprotocol=True),
            ]
            yield Pair(config, first, second, directory, session, bystanders)
        finally:
            for client in bystanders:
                await client.close()
            await session.close()
            first.stop()
            second.stop()
            await store.close()


# -- 1, 4, 6: every revocation cause, two instances -----------------------------------

TOKEN_CAUSES = {"token-reset", "token-expire", "token-delete"}
CAUSES = {  # the CLI command of each cause, for user {user}
    "token-reset": "token reset main --user {user}",
    "token-expire": "token expire main --user {user}",
    "token-delete": "token delete main --user {user}",
    "user-disabled": "user update {user} --disable",
    "user-deleted": "user delete {user}",
    # `other` grants other:read only: GET /echo/** (echo:read) is no longer granted.
    "roles-changed": "user update {user} --remove-roles writer --add-roles other",
}


@pytest.mark.parametrize("cause", list(CAUSES))
async def test_revocation_closes_the_sockets_on_both_instances_within_a_second(
    cause: str, pair: Pair, upstream: WsUpstream
) -> None:
    user = f"u-{cause}"
    token, spare = await new_user(pair.directory, user, "main", "spare")
    session = pair.session
    revoked = [
        await connect(session, pair.first, f"{cause}-first", token),
        await connect(session, pair.second, f"{cause}-second", token, subprotocol=True),
    ]
    # Sockets of the same user on a token the command does not touch.
    siblings = [
        await connect(session, pair.first, f"{cause}-spare-first", spare),
        await connect(session, pair.second, f"{cause}-spare-second", spare, subprotocol=True),
    ]
    try:
        returned, _ = await cli(pair.config, *CAUSES[cause].format(user=user).split())
        closing = revoked if cause in TOKEN_CAUSES else revoked + siblings
        delays = {}
        for client in closing:
            closed_at = await client.wait_closed()
            delays[client.name] = round(closed_at - returned, 3)
            assert client.code == POLICY, f"{client.name}: close code {client.code}"
            upstream_closed = await upstream.closed_at(client.name)
            delays[client.name + " (upstream)"] = round(upstream_closed - returned, 3)
        print(f"{cause}: close delays after the command returned {delays}")
        assert all(delay <= WITHIN for delay in delays.values()), delays

        if cause in TOKEN_CAUSES:
            await asyncio.sleep(0.3)  # past the next poll of the change feed: nothing else closes
            for client in siblings:
                await client.echo("sibling")
        await pair.bystanders_unaffected()

        # 6: the access line of each revoked socket, on its own instance.
        for process, client in zip((pair.first, pair.second), revoked, strict=True):
            line = await access_line(process, f"/echo/ws/{client.name}")
            assert line["status"] == 101, line
            assert line["closed_by"] == "revoked", line
            assert line["user"] == user, line
            assert token not in json.dumps(line), line
            assert token not in process.logs()
    finally:
        for client in revoked + siblings:
            await client.close()


# -- 2: a credential's own expiry --------------------------------------------------------


async def test_expires_at_closes_the_sockets_at_the_expiry_without_any_command(
    pair: Pair, upstream: WsUpstream
) -> None:
    user = "u-ttl"
    await new_user(pair.directory, user)
    # A whole second (the store and `--expires-at` may keep seconds only), far enough ahead
    # for the CLI to start and both sockets to open.
    expiry = math.ceil(time.time()) + 4
    stamp = datetime.fromtimestamp(expiry, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _, out = await cli(pair.config, "token", "set", "short", "--user", user, "--expires-at", stamp)
    token = secret_from(out)
    clients = [
        await connect(pair.session, pair.first, "ttl-first", token),
        await connect(pair.session, pair.second, "ttl-second", token, subprotocol=True),
    ]
    try:
        assert time.time() < expiry - 0.5, "the setup took too long for this test's expiry"
        for client in clients:
            await client.echo("before-expiry")
        for client in clients:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.closed.wait(), max(0.0, expiry - time.time()) + WAIT)
            assert client.closed_wall is not None, f"{client.name} still open after its expiry"
            late = client.closed_wall - expiry
            print(f"{client.name}: closed {late:.3f}s after the expiry")
            assert -0.05 <= late <= WITHIN, f"{client.name}: closed {late:.3f}s after its expiry"
            assert client.code == POLICY, client.code
            assert await upstream.closed_at(client.name) - client.closed_at <= WITHIN  # type: ignore[operator]
        await pair.bystanders_unaffected()
    finally:
        for client in clients:
            await client.close()


# -- 3: a reloaded policy ----------------------------------------------------------------


async def test_policy_reload_closes_the_sockets_it_no_longer_grants(
    tmp_path: Path, upstream: WsUpstream
) -> None:
    config = ws_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", upstream)
    store, directory = await open_directory(config)
    try:
        (writer,) = await new_user(directory, "writer-user", "main", role="writer")
        (reader,) = await new_user(directory, "reader-user", "main", role="reader")
    finally:
        await store.close()
    async with serving(config) as process, aiohttp.ClientSession() as session:
        losing = await connect(session, process, "reload-writer", writer)
        keeping = await connect(session, process, "reload-reader", reader, subprotocol=True)
        try:
            policy = config.parent / "policies" / "policy.yaml"
            # writer no longer includes reader: it has echo:write, not echo:read (GET /echo/**).
            changed = DEFAULT_POLICIES.replace("includes: [reader]", "includes: []")
            assert changed != DEFAULT_POLICIES
            policy.write_text(changed)
            sent = time.monotonic()
            process.signal(signal.SIGHUP)
            closed_at = await losing.wait_closed()
            print(f"reload: closed {closed_at - sent:.3f}s after SIGHUP")
            assert losing.code == POLICY, losing.code
            assert closed_at - sent <= WITHIN
            assert await upstream.closed_at("reload-writer") - sent <= WITHIN
            await asyncio.sleep(0.5)
            await keeping.echo("after-reload")
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(
                    f"{process.proxy}/echo/ws/reload-again", headers={"Authorization": f"Bearer {writer}"}
                )
            assert refused.value.status == 403
            line = await access_line(process, "/echo/ws/reload-writer")
            assert line["status"] == 101 and line["closed_by"] == "revoked", line
            assert writer not in process.logs()
        finally:
            await losing.close()
            await keeping.close()


# -- 5: the store cannot be read -------------------------------------------------------

GRACE = 2.0  # cache.outage_grace of the outage test, seconds
# The last successful poll may be up to one poll interval (0.25 s) older than the outage.
EARLIEST = GRACE - 0.3


def rename_changes_table(url: str, to: str) -> None:
    """SQLite: take the change table away from under the running process (its feed's reads
    fail from now on), as another process on the same file can."""
    database = make_url(url).database
    assert database is not None
    connection = sqlite3.connect(database, timeout=5, isolation_level=None)
    try:
        old = "changes" if to != "changes" else "changes_gone"
        connection.execute(f"ALTER TABLE {old} RENAME TO {to}")
    finally:
        connection.close()


async def refuse_pg_connections(url: str, allowed: bool) -> None:
    """PostgreSQL: the database refuses connections, and (when not `allowed`) every open one is cut."""
    name = make_url(url).database
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allowed else "false"}')
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def a_store(backend: str, directory: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{directory / 'gateway.db'}"
        return
    async with fresh_pg_database() as url:
        try:
            yield url
        finally:
            await refuse_pg_connections(url, allowed=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_store_outage_closes_the_socket_with_1013_after_the_grace(
    backend: str, tmp_path: Path, upstream: WsUpstream
) -> None:
    async with a_store(backend, tmp_path) as url:
        config = ws_config(tmp_path, url, upstream, extra_yaml=f"cache:\n  outage_grace: {GRACE}\n")
        store, directory = await open_directory(config)
        try:
            (token,) = await new_user(directory, "svc", "main")
        finally:
            await store.close()
        name = f"outage-{backend}"
        async with serving(config) as process, aiohttp.ClientSession() as session:
            client = await connect(session, process, name, token)
            try:
                if backend == "sqlite":
                    rename_changes_table(url, "changes_gone")
                else:
                    await refuse_pg_connections(url, allowed=False)
                cut = time.monotonic()
                await asyncio.sleep(EARLIEST - 0.2)
                await client.echo("within-the-grace")  # the relay needs no store
                closed_at = await client.wait_closed()
                print(f"{backend} outage: closed {closed_at - cut:.3f}s after the cut (grace {GRACE:g}s)")
                assert client.code == TRY_AGAIN, client.code
                assert EARLIEST <= closed_at - cut <= GRACE + WITHIN, closed_at - cut
                assert await upstream.closed_at(name) - closed_at <= WITHIN
                line = await access_line(process, f"/echo/ws/{name}")
                assert line["status"] == 101, line
                assert token not in process.logs()
            finally:
                await client.close()


# -- 7: SIGTERM ------------------------------------------------------------------------


async def test_sigterm_closes_sockets_with_1001_after_the_drain_delay(
    tmp_path: Path, upstream: WsUpstream
) -> None:
    drain_delay = 0.5
    config = ws_config(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        upstream,
        extra_yaml=f"shutdown: {{drain_delay: {drain_delay}, timeout: 5}}\n",
    )
    store, directory = await open_directory(config)
    try:
        (token,) = await new_user(directory, "svc", "main")
    finally:
        await store.close()
    async with serving(config) as process, aiohttp.ClientSession() as session:
        client = await connect(session, process, "shutdown", token, subprotocol=True)
        try:
            sent = time.monotonic()
            process.signal(signal.SIGTERM)
            closed_at = await client.wait_closed()
            print(f"shutdown: 1001 {closed_at - sent:.3f}s after SIGTERM (drain_delay {drain_delay}s)")
            assert client.code == GOING_AWAY, client.code
            assert drain_delay - 0.05 <= closed_at - sent <= drain_delay + WITHIN
            assert await upstream.closed_at("shutdown") - closed_at <= WITHIN
            while process.process.poll() is None:
                if time.monotonic() - sent > 10:
                    pytest.fail(f"still running 10s after SIGTERM:\n{process.logs()}")
                await asyncio.sleep(0.05)
            assert process.process.returncode == 0, process.logs()
            line = await access_line(process, "/echo/ws/shutdown")
            assert line["status"] == 101 and line["closed_by"] == "shutdown", line
            assert token not in process.logs()
        finally:
            await client.close()


# -- a change seen while the token lookup fails ---------------------------------------
# Store trust comes from the change feed alone: here the feed keeps reading `changes`, so the
# instance is not in an outage, but the lookup that decides the socket again cannot answer
# (a long lock on `tokens`, a busy lookup queue). Once the store answers again, the revoked
# socket must still be closed.

LOOKUP_TIMEOUT = 2.0  # store_call_timeout of the default outage grace (5 s)


async def test_a_revocation_seen_while_the_token_lookup_fails_still_closes_the_socket(
    tmp_path: Path, upstream: WsUpstream
) -> None:
    async with fresh_pg_database() as url:
        config = ws_config(tmp_path, url, upstream)
        store, directory = await open_directory(config)
        try:
            (token,) = await new_user(directory, "svc", "main")
        finally:
            await store.close()
        async with serving(config) as process, aiohttp.ClientSession() as session:
            client = await connect(session, process, "slow-lookup", token)
            try:
                locker = await asyncpg.connect(
                    url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5
                )
                transaction = locker.transaction()
                await transaction.start()
                try:
                    # Token lookups hang (they read `tokens`); the change feed and the CLI's
                    # `user update --disable` do not touch that table.
                    await locker.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
                    await cli(config, "user", "update", "svc", "--disable")
                    await asyncio.sleep(LOOKUP_TIMEOUT + 1.0)  # the recheck's lookup gave up
                finally:
                    await transaction.rollback()
                    await locker.close()
                answering = time.monotonic()
                async with session.get(
                    f"{process.proxy}/echo/a", headers={"Authorization": f"Bearer {token}"}
                ) as refused:
                    assert refused.status == 401  # the instance knows the user is disabled
                    assert (await refused.json())["error"] == "user_disabled"
                closed_at = await client.wait_closed()
                print(f"closed {closed_at - answering:.3f}s after the store answered again")
                assert client.code == POLICY, client.code
                assert closed_at - answering <= WITHIN
            finally:
                await client.close()
