"""Revocation delay across three `gateway serve` instances on one PostgreSQL store: push vs. poll.

Run it from the repository root (PostgreSQL at 127.0.0.1:5432, user postgres, trust auth):

    python -m bench.revocation                      # 200 rounds per mode, about 2 minutes
    python -m bench.revocation --rounds 50 --results bench/work/revocation.md
    python -m bench.revocation --help               # every option

What it measures. It creates a fresh database `gw_bench_revocation_<random>`, a small aiohttp
upstream in this process and three `gateway serve` processes (one worker each, one config)
on that database, then, in two modes of the same run:

1. push: as shipped: a statement trigger on `changes` (migration 0004) sends NOTIFY
   gateway_changes, every instance LISTENs and polls at once, the 250 ms poll stays;
2. poll only: the same processes after `DROP TRIGGER gateway_changes_notify ON changes`;
   their LISTEN connections stay up but receive nothing, so only the 250 ms poll applies.

Each round warms one token of a service user on all three instances (one 200 each, so its
identity is cached), waits a random fraction of the poll interval (so the revocation falls
at a random phase of the instances' poll ticks), expires the token through instance 1's
admin API (`POST /v1/service-users/{user}/tokens/{token}/expire`), and from the moment that
API answered polls each instance on its own keep-alive connection (one request at a time,
`--gap-ms` between them) until it answers 401; the delay is the time from the admin API's
answer to the arrival of that first 401. Instance 1 applies the change before it answers
(expected ~0); instances 2 and 3 learn it through the change feed, and their samples make the
table's main rows. The tokens of a mode are created before its rounds, and the feed has
applied that creation everywhere before the first warm-up, so a warmed token stays cached until
its own revocation.

Everything runs on 127.0.0.1 on the same machine: the client, the upstream (this process),
PostgreSQL and the three gateways share its cores, unpinned. Every process is started and
stopped by PID (in `finally` blocks), the database is dropped WITH (FORCE) at the end, and the
rounds of each mode stop at a time budget (`--budget`), so a run is bounded.

Output: a Markdown section on stdout (mode | samples | p50 | p90 | p99 | max, in ms), also
written to `--results FILE` when given; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from bench.procs import LOOPBACK, Proc, Processes, core_ticks, cpu_ticks, free_port, wait_until_quiet
from gateway import __version__ as GATEWAY_VERSION
from gateway.changefeed import ChangeFeed

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TRIGGER = "gateway_changes_notify"
USER = "svc"
ROLE = "revocation-reader"
PATH = "/bench/item"
INSTANCES = 3
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
QUIET = 0.25  # machine CPU use (all cores) under which a mode's rounds may start
# The change feed's poll interval: ChangeFeed's default, which `gateway serve` does not override.
POLL_INTERVAL = float(inspect.signature(ChangeFeed.__init__).parameters["interval"].default)

POLICY = f"""\
roles:
  service-user-project-admin:
    description: Every permission
    permissions: ["*"]
  {ROLE}:
    description: What the revocation bench's service user may do
    permissions: ["bench:read"]
routes:
  bench:
    rules:
      - methods: [GET]
        paths: ["/bench/**"]
        require: "bench:read"
"""


def log(message: str) -> None:
    print(f"[revocation] {message}", file=sys.stderr, flush=True)


# -- options -----------------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int
    gap_ms: float
    watch_timeout: float
    budget: float
    settle: float
    pg_dsn: str
    results: Path | None
    keep: bool
    seed: int | None
    argv: list[str]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.revocation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=200, help="revocations per mode (default 200)")
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=1.0,
        help="pause between two polls of one instance, ms (default 1; 0 = back to back)",
    )
    parser.add_argument(
        "--watch-timeout",
        type=float,
        default=3.0,
        help="seconds to wait for an instance's 401 before the sample counts as a timeout (default 3)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=75.0,
        help="seconds of rounds per mode at most; a mode stops early past it (default 75)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help=f"before each mode, wait up to this many seconds for the machine's CPU use to fall under "
        f"{QUIET * 100:g} %% (default 10; 0 = do not wait)",
    )
    parser.add_argument(
        "--pg-dsn",
        default=DEFAULT_PG,
        help=f"PostgreSQL DSN to create/drop the database (default {DEFAULT_PG})",
    )
    parser.add_argument("--results", type=Path, help="also write the Markdown section to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, gateway logs)")
    parser.add_argument("--seed", type=int, help="seed of the random pause before each revocation")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.gap_ms < 0 or args.settle < 0 or args.watch_timeout <= 0 or args.budget <= 0:
        parser.error("--gap-ms and --settle must be >= 0; --watch-timeout and --budget > 0")
    return Options(
        rounds=args.rounds,
        gap_ms=args.gap_ms,
        watch_timeout=args.watch_timeout,
        budget=args.budget,
        settle=args.settle,
        pg_dsn=args.pg_dsn,
        results=args.results,
        keep=args.keep,
        seed=args.seed,
        argv=list(sys.argv[1:] if argv is None else argv),
    )


# -- results -----------------------------------------------------------------------------------


@dataclass
class Watch:
    """One instance after one revocation: when it first answered 401, and how it got there."""

    instance: int  # 1, 2 or 3
    delay: float | None  # seconds from the admin API's answer to the first 401; None: timed out
    requests: int  # requests sent until then
    # Seconds from the admin API's answer to the sending of the last request answered 200 (None: the
    # first poll got the 401): the change was applied after that, so this bounds the delay from below.
    last_ok: float | None
    code: str  # the 401's error code (token_expired expected)
    unexpected: list[str] = field(default_factory=list)  # answers other than 200 and 401


@dataclass
class Mode:
    """The rounds of one mode."""

    key: str  # "push" or "poll"
    label: str
    watches: list[Watch] = field(default_factory=list)
    rounds_done: int = 0
    stopped_early: str = ""
    listen_backends: tuple[int, int] = (0, 0)  # (query LIKE 'LISTEN%', LISTEN or its SELECT 1 check)
    trigger_present: bool = False
    revoke_ms: list[float] = field(default_factory=list)  # how long the admin API call took
    rtt_ms: list[float] = field(default_factory=list)  # request round trips while polling
    seconds: float = 0.0
    settle: str = ""  # how long it waited for a quiet machine, and the CPU use then
    machine_busy: float = 0.0  # CPU use of the whole machine during the rounds (fraction of all cores)
    own_busy: float = 0.0  # of which this bench: client, gateways, the database's backends

    def delays(self, instances: Sequence[int]) -> list[float]:
        return [w.delay for w in self.watches if w.instance in instances and w.delay is not None]

    def timeouts(self, instances: Sequence[int]) -> int:
        return sum(1 for w in self.watches if w.instance in instances and w.delay is None)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, linear between closest ranks."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def row(label: str, values: Sequence[float], timeouts: int) -> str:
    if not values:
        return f"| {label} | 0 | – | – | – | – |"
    data = sorted(values)
    count = f"{len(data)}" + (f" (+{timeouts} timed out)" if timeouts else "")
    cells = [ms(percentile(data, q)) for q in (50, 90, 99)] + [ms(data[-1])]
    return f"| {label} | {count} | " + " | ".join(cells) + " |"


# -- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


# -- PostgreSQL --------------------------------------------------------------------------------


def database_dsn(admin_dsn: str, name: str) -> str:
    return admin_dsn.rsplit("/", 1)[0] + "/" + name


async def create_database(admin_dsn: str, name: str) -> str:
    """Create `name`; return the server's version."""
    connection = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    connection = await asyncpg.connect(admin_dsn, timeout=5)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def listen_backends(dsn: str, name: str) -> tuple[int, int]:
    """Backends of database `name` whose last statement was LISTEN, and those whose last one was
    LISTEN or the notification connection's `SELECT 1` liveness check (gateway.notify runs it
    every 5 s on that connection, after which pg_stat_activity shows it instead of LISTEN)."""
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) FILTER (WHERE query LIKE 'LISTEN%'),"
            " count(*) FILTER (WHERE query LIKE 'LISTEN%' OR query = 'SELECT 1')"
            " FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await connection.close()


async def backend_pids(dsn: str, name: str) -> list[int]:
    """The server processes of database `name`'s connections (the gateways' pools and listeners)."""
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        )
        return [int(row[0]) for row in rows]
    finally:
        await connection.close()


def ticks_of(pids: Sequence[int]) -> dict[int, int]:
    """CPU clock ticks so far of each live process of `pids`."""
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_ticks(pid)
        except OSError:
            continue
    return found


async def trigger_present(dsn: str) -> bool:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        found = await connection.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname = $1", TRIGGER)
        return bool(found)
    finally:
        await connection.close()


async def drop_trigger(dsn: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(f"DROP TRIGGER {TRIGGER} ON changes")
    finally:
        await connection.close()


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Instance:
    number: int
    proc: Proc
    proxy_port: int
    admin_port: int

    @property
    def proxy(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"


def write_config(directory: Path, store_url: str, upstream: str) -> Path:
    (directory / "policies").mkdir(parents=True, exist_ok=True)
    (directory / "policies" / "bench.yaml").write_text(POLICY)
    config = directory / "gateway.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listeners:
              proxy: "{LOOPBACK}:0"
              admin: "{LOOPBACK}:0"
            store:
              url: "{store_url}"
            policies: policies/
            log_level: info
            shutdown: {{drain_delay: 0, timeout: 5}}
            routes:
              - name: bench
                prefix: /bench
                upstream: "{upstream}"
            """
        )
    )
    return config


def gateway_cli(config: Path, env: dict[str, str], *args: str) -> str:
    argv = [sys.executable, "-m", "gateway", "--config", str(config), *args]
    done = subprocess.run(
        argv, env=env, cwd=config.parent, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"gateway {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def start_instance(procs: Processes, config: Path, number: int) -> Instance:
    proxy_port, admin_port = free_port(), free_port()
    saved = dict(procs.env)
    procs.env["GATEWAY_PROXY_LISTEN"] = f"{LOOPBACK}:{proxy_port}"
    procs.env["GATEWAY_ADMIN_LISTEN"] = f"{LOOPBACK}:{admin_port}"
    try:
        argv = [sys.executable, "-m", "gateway", "--config", str(config), "serve"]
        proc = procs.start(f"gateway-{number}", argv, cwd=config.parent)
    finally:
        procs.env.clear()
        procs.env.update(saved)
    return Instance(number, proc, proxy_port, admin_port)


async def wait_ready(session: aiohttp.ClientSession, instance: Instance, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not instance.proc.alive():
            raise RuntimeError(f"gateway {instance.number} exited early:\n{instance.proc.log_tail()}")
        try:
            async with session.get(instance.admin + "/readyz", timeout=REQUEST_TIMEOUT) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway {instance.number} not ready after {timeout}s:\n{instance.proc.log_tail()}")


async def start_upstream() -> tuple[web.AppRunner, str]:
    """A tiny upstream in this event loop: a fixed JSON body for every GET."""

    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    return runner, f"http://{LOOPBACK}:{port}"


# -- the measurement ---------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, instances: list[Instance], admin_token: str) -> None:
        self.options = options
        self.instances = instances
        self.admin_headers = {"Authorization": f"Bearer {admin_token}"}
        self.random = random.Random(options.seed)  # timing jitter, not a secret
        self.sessions: list[aiohttp.ClientSession] = []
        self.admin: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Bench:
        # One keep-alive connection per instance (limit=1), and one for the admin API.
        for _ in self.instances:
            self.sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)))
        self.admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in [*self.sessions, *([self.admin] if self.admin else [])]:
            await session.close()

    async def admin_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.admin is not None
        url = self.instances[0].admin + path
        async with self.admin.request(
            method, url, json=body, headers=self.admin_headers, timeout=REQUEST_TIMEOUT
        ) as response:
            payload = await response.json() if response.status != 204 else None
            if response.status not in (200, 201, 204):
                raise RuntimeError(f"{method} {path}: {response.status} {payload}")
            return payload

    async def create_tokens(self, prefix: str, count: int) -> list[tuple[str, str]]:
        """`count` tokens of USER through instance 1's admin API: (name, secret)."""
        made = []
        for number in range(count):
            name = f"{prefix}-{number:04d}"
            answer = await self.admin_call("POST", f"/v1/service-users/{USER}/tokens", {"name": name})
            made.append((name, str(answer["token"])))
        return made

    async def get(self, index: int, token: str) -> tuple[int, str]:
        """GET PATH on instance `index` (0-based) with `token`: (status, error code or "")."""
        headers = {"Authorization": f"Bearer {token}"}
        url = self.instances[index].proxy + PATH
        async with self.sessions[index].get(url, headers=headers, timeout=REQUEST_TIMEOUT) as response:
            body = await response.read()
            code = ""
            if response.status != 200:
                found = re.search(rb'"error":\s*"([^"]+)"', body)
                code = found.group(1).decode() if found else body[:80].decode(errors="replace")
            return response.status, code

    async def watch(self, index: int, token: str, answered: float, mode: Mode) -> Watch:
        """Poll instance `index` from `answered` (perf_counter of the admin API's answer) until 401."""
        gap = self.options.gap_ms / 1000
        deadline = answered + self.options.watch_timeout
        result = Watch(index + 1, None, 0, None, "")
        while True:
            sent = time.perf_counter()
            try:
                status, code = await self.get(index, token)
            except (aiohttp.ClientError, TimeoutError) as error:
                status, code = 0, f"{type(error).__name__}: {error}"
            now = time.perf_counter()
            result.requests += 1
            mode.rtt_ms.append((now - sent) * 1000)
            if status == 401:
                result.delay, result.code = now - answered, code
                return result
            if status == 200:
                result.last_ok = sent - answered
            elif len(result.unexpected) < 5:
                result.unexpected.append(f"{status} {code}")
            if now >= deadline:
                return result
            if gap:
                await asyncio.sleep(gap)

    async def round(self, mode: Mode, name: str, token: str) -> None:
        # Warm: one 200 on each instance, so the token's identity is cached everywhere.
        for index in range(len(self.instances)):
            status, code = await self.get(index, token)
            if status != 200:
                raise RuntimeError(f"warm-up of {name} on instance {index + 1}: {status} {code}")
        # A random phase against the instances' poll ticks (otherwise the rounds would lock to them).
        await asyncio.sleep(self.random.uniform(0, POLL_INTERVAL))
        asked = time.perf_counter()
        answer = await self.admin_call("POST", f"/v1/service-users/{USER}/tokens/{name}/expire")
        answered = time.perf_counter()
        if answer.get("expired") is not True:
            raise RuntimeError(f"expire {name}: {answer}")
        mode.revoke_ms.append((answered - asked) * 1000)
        watches = await asyncio.gather(
            *(self.watch(index, token, answered, mode) for index in range(len(self.instances)))
        )
        mode.watches.extend(watches)

    async def run_mode(self, mode: Mode, dsn: str, database: str) -> None:
        log(f"{mode.label}: creating {self.options.rounds} tokens")
        tokens = await self.create_tokens(mode.key, self.options.rounds)
        # Let every instance's feed apply those creations (they evict the user) before any warm-up.
        await asyncio.sleep(3 * POLL_INTERVAL)
        mode.trigger_present = await trigger_present(dsn)
        mode.listen_backends = await listen_backends(dsn, database)
        log(
            f"{mode.label}: trigger {'present' if mode.trigger_present else 'absent'}, LISTEN backends "
            f"{mode.listen_backends[0]} (with the SELECT 1 check: {mode.listen_backends[1]})"
        )
        if self.options.settle > 0:
            waited, busy = await asyncio.to_thread(wait_until_quiet, QUIET, self.options.settle)
            mode.settle = f"waited {waited:.0f} s for a quiet machine (CPU use then {busy * 100:.0f} %)"
            log(f"{mode.label}: {mode.settle}")
        own = [os.getpid(), *(i.proc.pid for i in self.instances), *await backend_pids(dsn, database)]
        cpu_before, machine_before = ticks_of(own), core_ticks()
        started = time.monotonic()
        for number, (name, secret) in enumerate(tokens):
            if time.monotonic() - started > self.options.budget:
                mode.stopped_early = f"stopped after {number} rounds: --budget {self.options.budget:g}s"
                log(mode.stopped_early)
                break
            await self.round(mode, name, secret)
            mode.rounds_done = number + 1
            if mode.rounds_done % 50 == 0:
                log(f"{mode.label}: {mode.rounds_done} rounds")
        mode.seconds = time.monotonic() - started
        busy0, total0 = machine_before
        busy1, total1 = core_ticks()
        cpu_after = ticks_of(own + await backend_pids(dsn, database))
        own_ticks = sum(ticks - cpu_before.get(pid, 0) for pid, ticks in cpu_after.items())
        mode.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
        # own ticks over all cores' ticks (total counts every core's ticks).
        mode.own_busy = own_ticks / max(1, total1 - total0)
        after = await listen_backends(dsn, database)
        mode.listen_backends = (
            min(mode.listen_backends[0], after[0]),
            min(mode.listen_backends[1], after[1]),
        )


# -- the report --------------------------------------------------------------------------------


@dataclass
class Context:
    started: datetime
    database: str
    postgres: str = "?"
    load_before: str = "?"
    listen_logged: list[int] = field(
        default_factory=list
    )  # "listening for change notifications" per instance
    notify_down: list[int] = field(default_factory=list)  # "change notifications unavailable" per instance


def report(options: Options, modes: list[Mode], context: Context) -> str:
    remote = (2, 3)
    lines = [
        "## Revocation delay across three instances (PostgreSQL): LISTEN/NOTIFY vs. poll only",
        "",
        f"Run of {context.started:%Y-%m-%d %H:%M} UTC: `python -m bench.revocation"
        + (f" {shlex.join(options.argv)}" if options.argv else "")
        + "`. Delay = from the answer of instance 1's admin API (token expire) to the arrival of the "
        "first 401 from an instance polled on its own keep-alive connection "
        f"({options.gap_ms:g} ms between polls). Change-feed poll interval: {POLL_INTERVAL * 1000:g} ms.",
        "",
        "| mode | samples | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for mode in modes:
        lines.append(row(f"{mode.label}, instances 2+3", mode.delays(remote), mode.timeouts(remote)))
    for mode in modes:
        lines.append(
            row(f"{mode.label}, instance 1 (made the change)", mode.delays((1,)), mode.timeouts((1,)))
        )
    lines += ["", "All figures in ms. Per instance (p50 / p99 / max, ms):", ""]
    for mode in modes:
        parts = []
        for instance in remote:
            data = sorted(mode.delays((instance,)))
            if data:
                parts.append(
                    f"instance {instance}: {ms(percentile(data, 50))} / {ms(percentile(data, 99))} / "
                    f"{ms(data[-1])}"
                )
        lines.append(f"- {mode.label}: " + "; ".join(parts))
    lines += ["", "Run details:", ""]
    for mode in modes:
        unexpected = [f"instance {w.instance}: {u}" for w in mode.watches for u in w.unexpected]
        codes = sorted({w.code for w in mode.watches if w.delay is not None})
        rtt = sorted(mode.rtt_ms)
        remote_watches = [w for w in mode.watches if w.instance in remote and w.delay is not None]
        lower = sorted(w.last_ok or 0.0 for w in remote_watches)
        first_hit = sum(1 for w in remote_watches if w.last_ok is None)
        revoke = sorted(mode.revoke_ms)
        lines.append(
            f"- {mode.label}: {mode.rounds_done} rounds in {mode.seconds:.1f} s"
            + (f" ({mode.stopped_early})" if mode.stopped_early else "")
            + f"; instances 2+3: lower bound of the delay (the last 200's request sent) p50 "
            f"{ms(percentile(lower, 50))} ms, p99 {ms(percentile(lower, 99))} ms, first poll already 401 "
            f"in {first_hit} of {len(remote_watches)}"
            + f"; trigger {TRIGGER} {'present' if mode.trigger_present else 'dropped'}; "
            f"LISTEN backends in pg_stat_activity {mode.listen_backends[0]} "
            f"(counting those whose last statement is the listener's `SELECT 1` check: "
            f"{mode.listen_backends[1]}); 401 codes {', '.join(codes) or '–'}; "
            f"admin API expire call p50 {percentile(revoke, 50):.1f} ms; "
            f"poll round trip p50 {percentile(rtt, 50):.2f} ms, p99 {percentile(rtt, 99):.2f} ms; "
            f"{mode.settle + '; ' if mode.settle else ''}CPU use during the rounds "
            f"{mode.machine_busy * 100:.0f} % of all cores, of which this bench (client, gateways, their "
            f"database backends) {mode.own_busy * 100:.0f} %"
            + (f"; unexpected answers: {'; '.join(unexpected[:5])}" if unexpected else "")
        )
    lines.append(
        f"- gateway logs: 'listening for change notifications' {context.listen_logged} times per instance, "
        f"'change notifications unavailable' {context.notify_down}."
    )
    lines += [
        "",
        f"Machine: {nproc()} cores (nproc), {cpu_model()}, {platform.system()} {platform.release()}; "
        f"load average before the run {context.load_before}; Python {platform.python_version()}, "
        f"PostgreSQL {context.postgres}, gateway {GATEWAY_VERSION}. The client (and the upstream, in "
        "the same process), PostgreSQL and the three gateways all run on this same box, unpinned; "
        f"database {context.database}, dropped at the end.",
        "",
    ]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


async def measure(options: Options, procs: Processes, work: Path, context: Context) -> list[Mode]:
    context.postgres = await create_database(options.pg_dsn, context.database)
    log(f"created database {context.database} (PostgreSQL {context.postgres})")
    dsn = database_dsn(options.pg_dsn, context.database)
    store_url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    runner, upstream = await start_upstream()
    try:
        config = write_config(work, store_url, upstream)
        # The admin identity, through the CLI (it migrates the fresh database first).
        await asyncio.to_thread(gateway_cli, config, procs.env, "user", "create", "root", "--admin")
        out = await asyncio.to_thread(gateway_cli, config, procs.env, "token", "set", "ops", "--user", "root")
        found = re.search(r"^Access token: (gw_\S+)$", out, re.MULTILINE)
        if found is None:
            raise RuntimeError("no 'Access token:' line in the output of `gateway token set`")
        admin_token = found.group(1)
        # Instance 1 first (it makes the signing key and gateway.secret), then 2 and 3 beside it.
        instances = [start_instance(procs, config, 1)]
        async with aiohttp.ClientSession() as probe:
            await wait_ready(probe, instances[0])
            instances += [start_instance(procs, config, number) for number in range(2, INSTANCES + 1)]
            await asyncio.gather(*(wait_ready(probe, instance) for instance in instances[1:]))
        log("three gateways ready: " + ", ".join(f"{i.proxy} (pid {i.proc.pid})" for i in instances))
        modes = [
            Mode("push", "push (LISTEN/NOTIFY + poll)"),
            Mode("poll", "poll only (trigger dropped)"),
        ]
        async with Bench(options, instances, admin_token) as bench:
            await bench.admin_call("POST", "/v1/service-users", {"name": USER, "roles": [ROLE]})
            await bench.run_mode(modes[0], dsn, context.database)
            await drop_trigger(dsn)
            log(f"dropped trigger {TRIGGER}; the listeners stay connected and receive nothing")
            await bench.run_mode(modes[1], dsn, context.database)
        for instance in instances:
            text = instance.proc.log_path.read_text(errors="replace")
            context.listen_logged.append(text.count("listening for change notifications"))
            context.notify_down.append(text.count("change notifications unavailable"))
        return modes
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # SIGTERM as Ctrl-C: the finally blocks below stop the gateways and drop the database.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    context = Context(started=datetime.now(UTC), database=f"gw_bench_revocation_{secrets.token_hex(4)}")
    context.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    work = Path(tempfile.mkdtemp(prefix="gw-revocation-"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    procs = Processes(work, env)
    modes: list[Mode] = []
    try:
        try:
            modes = asyncio.run(measure(options, procs, work, context))
        finally:
            procs.stop_all()
            try:
                asyncio.run(drop_database(options.pg_dsn, context.database))
                log(f"dropped database {context.database}")
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                log(f"could not drop database {context.database}: {error}")
    finally:
        if options.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report(options, modes, context)
    print(text)
    if options.results is not None:
        options.results.parent.mkdir(parents=True, exist_ok=True)
        options.results.write_text(text)
        log(f"wrote {options.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
