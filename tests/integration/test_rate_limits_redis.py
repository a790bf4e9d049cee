"""Rate limits on the real Redis, through real `gateway serve` processes (CONTRACT "Rate limits").

- one process admits `burst + rate × elapsed` (±10 %) to a client sending far faster than that;
- two processes on one Redis (and one PostgreSQL store), and one process with `--workers 2`,
  admit that rate together, not twice it;
- every 429 carries `Retry-After` and the RateLimit headers, and `r=` is never negative;
- Redis refusing connections, paused (`CLIENT PAUSE`), killed and restarted: `on_store_error`
  decides within a bounded wait (allow → 200, deny → 503 store_unavailable), one "unreachable"
  log line per outage and one "reachable again" after it, counted in
  `gateway_rate_limit_store_errors_total`, and the Redis password in no log and no answer;
- `auth_failures` counted across two processes;
- GATEWAY_RATE_LIMIT_STORE_URL overrides the file.

How the rate is measured so that a slow (loaded) test machine cannot fail it: several clients
send far faster than the limit, so the key is never idle for longer than its burst takes to
refill (that is what would lose admissions); the expected count is computed from the elapsed
time the server can have seen, bounded from both sides by the clients' timestamps (from the
first answer to the last send, at least; from the first send to the last answer, at most), and
±10 % is applied on top of those bounds. Any client-side delay only widens the bounds. A limit
off by 2x, or not enforced at all, or counted per process, is far outside them.

The pause and the kill are done on a redis-server of this test's own (on a free port, with a
password), never on the shared one: `CLIENT PAUSE ALL` stops every client of a server, and other
test runs use the shared server's other databases at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis_client
from aiohttp.test_utils import TestServer

from tests.conftest import IN_CI, REDIS_DATABASE, eventually, fresh_pg_database, write_config
from tests.process import GatewayProcess, free_port, serving, writer_token

RATE = 20  # per second
BURST = 10  # a stall of the machine shorter than BURST / RATE (0.5 s) loses no admission
PER_USER = f"{{rate: {RATE}, per: 1s, burst: {BURST}}}"
TOLERANCE = 0.10  # the contract's ±10 %
DRIVE_SECONDS = 3.0
CLIENTS = 6  # concurrent clients in all
PACE = 0.01  # seconds each client waits between its requests (≈ 10x the limit even when slow)
REQUEST_BOUND = 1.0  # seconds any one request may take while the store is down (the gateway's: 0.25)
SECRET = "s3cretpw"
UNREACHABLE = "rate-limit store unreachable"
REACHABLE = "rate-limit store reachable again"
_RATE_LIMIT_RE = re.compile(r'^"(user|route|auth)";r=(-?\d+);t=(-?\d+)$')


# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Shot:
    """One request and its answer, with the client's timestamps (time.monotonic())."""

    url: str
    sent: float
    done: float
    status: int
    error: str | None  # the JSON body's "error"
    body: str
    policy: str | None  # RateLimit-Policy
    state: str | None  # RateLimit
    retry_after: str | None

    @property
    def seconds(self) -> float:
        return self.done - self.sent


def limits_config(
    directory: Path,
    upstream: TestServer,
    *,
    store: str,
    database: str,
    on_store_error: str = "allow",
    per_user: str | None = PER_USER,
    auth_failures: str | None = None,
) -> Path:
    """A gateway.yaml in `directory` (created) with a `rate_limits` block."""
    directory.mkdir(parents=True, exist_ok=True)
    block = f'rate_limits:\n  store: "{store}"\n  on_store_error: {on_store_error}\n'
    if per_user is not None:
        block += f"  per_user: {per_user}\n"
    if auth_failures is not None:
        block += f"  auth_failures: {auth_failures}\n"
    return write_config(
        directory,
        store_url=database,
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        extra_yaml=block,
    )


async def shoot(session: aiohttp.ClientSession, url: str, token: str) -> Shot:
    """GET `url` with `token`; never waits more than 10 s (a hang fails the test, not the run)."""
    sent = time.monotonic()
    async with session.get(
        url, headers={"Authorization": f"Bearer {token}"}, timeout=aiohttp.ClientTimeout(total=10)
    ) as response:
        body = await response.text()
        done = time.monotonic()
        error = None
        if response.content_type == "application/json" and response.status >= 400:
            error = json.loads(body).get("error")
        return Shot(
            url,
            sent,
            done,
            response.status,
            error,
            body,
            response.headers.get("RateLimit-Policy"),
            response.headers.get("RateLimit"),
            response.headers.get("Retry-After"),
        )


async def drive(
    urls: Sequence[str], token: str, *, seconds: float = DRIVE_SECONDS, new_connections: bool = False
) -> list[Shot]:
    """CLIENTS clients (spread over `urls`) each sending one request after another for `seconds`.

    With `new_connections`, every request opens its own connection (so the kernel spreads
    them over the workers of one listener)."""
    deadline = time.monotonic() + seconds
    shots: list[Shot] = []

    async def client(url: str) -> None:
        connector = aiohttp.TCPConnector(force_close=new_connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.monotonic() < deadline:
                shots.append(await shoot(session, url, token))
                await asyncio.sleep(PACE)

    await asyncio.gather(*(client(urls[index % len(urls)]) for index in range(CLIENTS)))
    return shots


def assert_rate(shots: Sequence[Shot], what: str) -> str:
    """Assert the 200s are `BURST + RATE × elapsed` (±10 %); a line with the numbers for the report."""
    assert shots, "no request was sent"
    statuses = {shot.status for shot in shots}
    assert statuses <= {200, 429}, f"{what}: unexpected statuses {statuses}"
    admitted = sum(shot.status == 200 for shot in shots)
    # The server decided every request between its send and its answer: the span from its first
    # decision to its last is at least (last send - first answer) and at most (last answer - first send).
    shortest = max(shot.sent for shot in shots) - min(shot.done for shot in shots)
    longest = max(shot.done for shot in shots) - min(shot.sent for shot in shots)
    # A stall of the machine (seen as no answer at all for a while) longer than the burst lasts
    # loses what the rate would have earned beyond the burst: no limiter can admit requests it
    # did not see. Only the lower bound allows for it.
    answered = sorted(shot.done for shot in shots)
    stalled = sum(max(0.0, later - earlier - BURST / RATE) for earlier, later in itertools.pairwise(answered))
    low = BURST + RATE * (shortest - stalled)
    high = BURST + RATE * longest
    report = (
        f"{what}: {admitted} admitted of {len(shots)} in {shortest:.3f}-{longest:.3f} s"
        f"{f' ({stalled:.2f} s stalled)' if stalled else ''}; "
        f"expected {low:.1f}-{high:.1f} (±10 %: {low * (1 - TOLERANCE):.1f}-{high * (1 + TOLERANCE):.1f})"
    )
    print(report)
    assert low * (1 - TOLERANCE) <= admitted <= high * (1 + TOLERANCE), report
    assert 429 in statuses, report
    return report


def assert_rate_headers(shots: Sequence[Shot]) -> None:
    """Every answer carries the RateLimit headers; every 429 also Retry-After; `r` never negative."""
    for shot in shots:
        assert shot.policy == f'"user";q={BURST};w=1', shot
        assert shot.state is not None, shot
        match = _RATE_LIMIT_RE.match(shot.state)
        assert match is not None, shot
        remaining, wait = int(match[2]), int(match[3])
        assert remaining >= 0 and wait >= 0, shot
        if shot.status == 200:
            assert remaining < BURST and shot.retry_after is None, shot
        else:
            assert shot.status == 429 and shot.error == "rate_limited", shot
            assert remaining == 0 and wait >= 1, shot
            # Whole seconds, at least 1 (the emission interval is 50 ms, so exactly 1).
            assert shot.retry_after == "1", shot


def store_lines(logs: str, prefix: str) -> list[dict[str, object]]:
    """The JSON log lines in `logs` whose message starts with `prefix`."""
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    return [line for line in lines if str(line.get("message", "")).startswith(prefix)]


async def metric(process: GatewayProcess, name: str) -> float:
    """The value of the unlabelled sample `name` on the admin /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(process.admin + "/metrics") as response:
            assert response.status == 200
            text = await response.text()
    assert SECRET not in text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def script_connections(redis_url: str) -> int:
    """Connections to the test's Redis database whose last command ran the rate-limit script."""
    client = redis_client.Redis.from_url(redis_url, socket_timeout=5)
    try:
        clients = await client.client_list()
    finally:
        await client.aclose()
    return sum(
        1
        for entry in clients
        if int(entry.get("db", -1)) == REDIS_DATABASE and entry.get("cmd") in ("evalsha", "eval")
    )


async def first_token(config: Path, *others: Path) -> str:
    """A writer token in the store the configs share; the other instances get the first one's
    signing secret (`gateway.secret` beside its config), as a second instance must."""
    token = await writer_token(config)
    for other in others:
        shutil.copyfile(config.parent / "gateway.secret", other.parent / "gateway.secret")
    return token


async def start_all(*processes: GatewayProcess) -> None:
    await asyncio.gather(*(process.wait_ready() for process in processes))


@contextlib.asynccontextmanager
async def running(*processes: GatewayProcess) -> AsyncIterator[None]:
    """Wait until all `processes` are ready; stop them all afterwards."""
    try:
        await start_all(*processes)
        yield
    finally:
        for process in processes:
            process.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens: bound (so no other process takes it meanwhile) but
    not listening, so a connection to it is refused at once."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield int(holder.getsockname()[1])


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """A new database on the real PostgreSQL: the store two processes share."""
    async with fresh_pg_database() as url:
        yield url


class PrivateRedis:
    """A redis-server of this test's own on a free port, user `gw` with the password SECRET."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.conf = directory / "redis.conf"
        self.conf.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {directory}\n'
            f"user default off\nuser gw on >{SECRET} ~* &* +@all\n"
        )
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://gw:{SECRET}@127.0.0.1:{self.port}/0"

    def client(self) -> redis_client.Redis:
        return redis_client.Redis(
            host="127.0.0.1", port=self.port, username="gw", password=SECRET, socket_timeout=10
        )

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        client = self.client()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if await client.ping():
                        return
                except (OSError, redis_client.RedisError):
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(f"redis-server did not start:\n{self.log.read_text()}") from None
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        message = "redis-server is needed (a Redis of this test's own, to pause and to kill)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    await server.start()
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------
# 1 and 3: the refill rate of one process, and the headers of every answer


async def test_one_process_admits_burst_plus_rate_and_every_answer_has_the_headers(
    tmp_path: Path, upstream: TestServer, redis_url: str
) -> None:
    config = limits_config(tmp_path, upstream, store=redis_url, database="sqlite+aiosqlite:///gateway.db")
    async with serving(config) as (process, token):
        shots = await drive([process.proxy + "/echo/a"], token)
    assert_rate(shots, "one process")
    assert_rate_headers(shots)


# ---------------------------------------------------------------------------------------------
# 2: processes and workers share the counters


async def test_two_processes_on_one_redis_admit_the_rate_together(
    tmp_path: Path, upstream: TestServer, redis_url: str, pg_database: str
) -> None:
    first = limits_config(tmp_path / "a", upstream, store=redis_url, database=pg_database)
    second = limits_config(tmp_path / "b", upstream, store=redis_url, database=pg_database)
    token = await first_token(first, second)  # one store: the same user and token on both
    a, b = GatewayProcess(first), GatewayProcess(second)
    async with running(a, b):
        shots = await drive([a.proxy + "/echo/a", b.proxy + "/echo/a"], token)
        connections = await script_connections(redis_url)
    for process in (a, b):
        assert sum(shot.status == 200 and shot.url.startswith(process.proxy) for shot in shots) > 0
    assert_rate(shots, "two processes")
    assert_rate_headers(shots)
    assert connections == 2  # one connection to Redis per process: both counted in Redis


async def test_two_workers_on_one_redis_admit_the_rate_together(
    tmp_path: Path, upstream: TestServer, redis_url: str
) -> None:
    config = limits_config(tmp_path, upstream, store=redis_url, database="sqlite+aiosqlite:///gateway.db")
    async with serving(config, workers=2) as (process, token):
        shots = await drive([process.proxy + "/echo/a"], token, new_connections=True)
        connections = await script_connections(redis_url)
    assert_rate(shots, "two workers")
    assert_rate_headers(shots)
    # Each worker keeps its own connection to Redis: both served requests, and counted in Redis.
    assert connections == 2


# ---------------------------------------------------------------------------------------------
# 4: Redis down


@dataclass
class Outage:
    """Requests to each gateway while its Redis is down; `certain` marks those known to be inside."""

    shots: dict[str, list[Shot]]
    certain: dict[str, list[Shot]]


async def during(
    gateways: dict[str, tuple[GatewayProcess, str]], seconds: float, until: float | None = None
) -> Outage:
    """One client per gateway, a request every 0.1 s for `seconds`; requests answered before the
    monotonic time `until` (default: all) are `certain` to have met the outage."""
    outage = Outage({name: [] for name in gateways}, {name: [] for name in gateways})
    deadline = time.monotonic() + seconds

    async def client(name: str, process: GatewayProcess, token: str) -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                shot = await shoot(session, process.proxy + "/echo/a", token)
                outage.shots[name].append(shot)
                if until is None or shot.done < until:
                    outage.certain[name].append(shot)
                await asyncio.sleep(0.1)

    await asyncio.gather(*(client(name, *gateway) for name, gateway in gateways.items()))
    return outage


def assert_outage(outage: Outage, allowed: Sequence[str], denied: Sequence[str]) -> None:
    for name, shots in outage.shots.items():
        for shot in shots:
            assert shot.seconds < REQUEST_BOUND, (name, shot)
            assert shot.status in (200, 503), (name, shot)  # never a 500, never a 429
            assert SECRET not in shot.body, (name, shot)
    for name in allowed:
        assert len(outage.certain[name]) >= 3, (name, outage.shots[name])
        assert {shot.status for shot in outage.certain[name]} == {200}, (name, outage.certain[name])
    for name in denied:
        assert len(outage.certain[name]) >= 3, (name, outage.shots[name])
        assert {(shot.status, shot.error) for shot in outage.certain[name]} == {(503, "store_unavailable")}


async def test_redis_down_on_store_error_decides_quickly_logged_once_per_outage_no_password(
    tmp_path: Path, upstream: TestServer, private_redis: PrivateRedis, closed_port: int
) -> None:
    closed = f"redis://user:{SECRET}@127.0.0.1:{closed_port}/0"  # nothing listens there
    database = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"  # one store for the four
    generous = "{rate: 1000, per: 1s, burst: 1000}"  # the limit itself plays no part here
    stores = {"closed-allow": closed, "closed-deny": closed}
    stores |= {"paused-allow": private_redis.url, "paused-deny": private_redis.url}
    configs = {
        name: limits_config(
            tmp_path / name,
            upstream,
            store=store,
            database=database,
            per_user=generous,
            on_store_error=name.split("-")[1],
        )
        for name, store in stores.items()
    }
    token = await first_token(*configs.values())
    processes = {name: GatewayProcess(config) for name, config in configs.items()}
    gateways = {name: (process, token) for name, process in processes.items()}
    redis_gateways = {name: gateways[name] for name in ("paused-allow", "paused-deny")}
    answers: list[Shot] = []
    async with running(*processes.values()):
        # Redis up: the two on the private Redis admit; the two on the closed port follow their setting.
        before = await during(gateways, 0.8)
        assert {shot.status for name in redis_gateways for shot in before.shots[name]} == {200}
        assert_outage(before, allowed=["closed-allow"], denied=["closed-deny"])

        # Outage 1: Redis paused (connections stay open, nothing is answered).
        pauser, unpauser = private_redis.client(), private_redis.client()
        try:
            await pauser.client_pause(3000, all=True)  # CLIENT PAUSE 3000 ALL
            surely_paused_until = time.monotonic() + 2.5
            paused = await during(gateways, 1.5, until=surely_paused_until)
            # (Redis 7.0 answers UNPAUSE itself only when the pause is over.)
            await unpauser.client_unpause()
        finally:
            await pauser.aclose()
            await unpauser.aclose()
        assert_outage(paused, allowed=["closed-allow", "paused-allow"], denied=["closed-deny", "paused-deny"])
        await back(processes, token, recovered=1)

        # Outage 2: Redis killed (connections reset, then refused), then started again (empty).
        private_redis.kill()
        killed = await during(gateways, 1.0)
        assert_outage(killed, allowed=["closed-allow", "paused-allow"], denied=["closed-deny", "paused-deny"])
        await private_redis.start()
        await back(processes, token, recovered=2)

        for outage in (before, paused, killed):
            answers += [shot for shots in outage.shots.values() for shot in shots]
        for name, process in processes.items():
            errors = await metric(process, "gateway_rate_limit_store_errors_total")
            assert errors > 0, name
        logs = {name: process.logs() for name, process in processes.items()}

    outages = {"closed-allow": 1, "closed-deny": 1, "paused-allow": 2, "paused-deny": 2}
    recoveries = {"closed-allow": 0, "closed-deny": 0, "paused-allow": 2, "paused-deny": 2}
    slowest = max(shot.seconds for shot in answers)
    print(f"store down: {len(answers)} requests, the slowest answered in {slowest * 1000:.0f} ms")
    for name in processes:
        down = store_lines(logs[name], UNREACHABLE)
        up = store_lines(logs[name], REACHABLE)
        assert (len(down), len(up)) == (outages[name], recoveries[name]), (name, down, up)
        port = closed.rsplit(":", 1)[1] if name.startswith("closed") else f"{private_redis.port}/0"
        for line in down + up:
            assert str(line["store"]).endswith(port) and ":***@127.0.0.1:" in str(line["store"]), line
        assert SECRET not in logs[name], name
    assert all(SECRET not in shot.body for shot in answers)


async def back(processes: dict[str, GatewayProcess], token: str, *, recovered: int) -> None:
    """Once Redis answers again: the deny gateway admits again, and both gateways on it have
    logged their `recovered`-th "reachable again" (the allow one noticing on a request)."""

    async def healed() -> bool:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for name in ("paused-allow", "paused-deny"):
                shot = await shoot(session, processes[name].proxy + "/echo/a", token)
                assert shot.seconds < REQUEST_BOUND and shot.status in (200, 503), (name, shot)
                statuses.append(shot.status)
        logged = [
            len(store_lines(processes[name].logs(), REACHABLE)) for name in ("paused-allow", "paused-deny")
        ]
        return statuses == [200, 200] and min(logged) >= recovered

    await eventually(healed, within=5.0)


# ---------------------------------------------------------------------------------------------
# 5: auth_failures across processes


async def test_auth_failures_add_up_across_two_processes(
    tmp_path: Path, upstream: TestServer, redis_url: str, pg_database: str
) -> None:
    failures = 6
    first, second = (
        limits_config(
            tmp_path / name,
            upstream,
            store=redis_url,
            database=pg_database,
            per_user=None,
            auth_failures=f"{{rate: 1, per: 1m, burst: {failures}}}",
        )
        for name in ("a", "b")
    )
    token = await first_token(first, second)
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    a, b = GatewayProcess(first), GatewayProcess(second)
    async with running(a, b):
        async with aiohttp.ClientSession() as session:
            counted = []
            for index in range(failures):  # alternately: a, b, a, b, ...
                process = (a, b)[index % 2]
                counted.append(await shoot(session, process.proxy + "/echo/a", wrong))
            blocked = [
                await shoot(session, process.proxy + "/echo/a", secret)
                for process in (a, b)
                for secret in (wrong, token)
            ]
    assert [(shot.status, shot.error) for shot in counted] == [(401, "invalid_token")] * failures, counted
    # One counter: what is left goes down by one per failure, whichever process saw it.
    expected = [f'"auth";r={left};t=0' for left in range(failures - 1, 0, -1)] + ['"auth";r=0;t=60']
    assert [shot.state for shot in counted] == expected, counted
    for shot in blocked:  # the address is blocked on both, valid credential or not
        assert (shot.status, shot.error) == (429, "rate_limited"), shot
        assert shot.policy == f'"auth";q={failures};w={60 * failures}', shot
        assert shot.retry_after is not None and int(shot.retry_after) >= 1, shot
        assert shot.state is not None and shot.state.startswith('"auth";r=0;t='), shot


# ---------------------------------------------------------------------------------------------
# 6: the environment overrides the file


async def test_store_url_from_the_environment_overrides_the_file(
    tmp_path: Path, upstream: TestServer, redis_url: str, closed_port: int
) -> None:
    closed = f"redis://127.0.0.1:{closed_port}/0"  # what the file says: nothing listens there
    config = limits_config(
        tmp_path,
        upstream,
        store=closed,
        database="sqlite+aiosqlite:///gateway.db",
        on_store_error="deny",
        per_user="{rate: 1, per: 1m, burst: 3}",
    )
    async with serving(config, extra_env={"GATEWAY_RATE_LIMIT_STORE_URL": redis_url}) as (process, token):
        async with aiohttp.ClientSession() as session:
            shots = [await shoot(session, process.proxy + "/echo/a", token) for _ in range(5)]
        assert not store_lines(process.logs(), UNREACHABLE)
    assert [shot.status for shot in shots] == [200, 200, 200, 429, 429], shots
    client = redis_client.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert await client.exists("gateway:rl:u:svc") == 1  # the counter is in the env's Redis
    finally:
        await client.aclose()
