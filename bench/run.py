"""The gateway benchmark: throughput and latency, streaming, cold lookups, TLS and WebSocket
(edge); writes bench/RESULTS.md.

Run it through `bash bench/run.sh [OPTIONS]` (which installs nginx-light and wrk); the
options are those of `python -m bench.run --help`. Every process is started and
stopped by PID, all traffic goes to 127.0.0.1, and every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import report
from bench.load import StreamResult, WrkResult, run_curl_stream, run_wrk, run_ws_load, shown
from bench.lookups import LookupResult, measure
from bench.procs import (
    LOOPBACK,
    Processes,
    child_pids,
    cpu_ticks,
    free_port,
    http_get,
    tls_probe,
    wait_until_quiet,
)
from bench.servers import (
    ASSERTION_PATH,
    BENCH_PATH,
    REPO,
    UPSTREAM_BODY,
    WS_PATH,
    AccessToken,
    GatewaySetup,
    Server,
    TlsPair,
    create_bench_key,
    create_bench_token,
    exchange_api_key,
    gateway_serve_argv,
    start_bare_proxy,
    start_gateway,
    start_nginx_proxy,
    start_nginx_upstream,
    start_stream_upstream,
    start_ws_upstream,
    token_endpoint_url,
    write_gateway_config,
    write_self_signed_pair,
)
from bench.ws_load import sanity as ws_sanity

SCENARIOS = ("throughput", "streaming", "lookups", "edge")
DEFAULT_PG = os.environ.get("GATEWAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
# Cores: the load generator and the upstream share core 0; the server under test has core 1.
LOAD_CPUS = "0"
SUT_CPUS = "1"
QUIET = 0.25  # machine CPU use (both cores) under which a measurement may start
# An access token is exchanged again when less than this many seconds of it remain, so that
# a long run (--duration, --rounds) never measures (j) with an expired JWT.
TOKEN_MARGIN = 300.0
BENCH_REDIS = "redis://127.0.0.1:6379/3"


def redis_ready(url: str) -> bool:
    """Whether Redis answers at `url`; its database is emptied for the run."""
    from gateway.redis_client import RedisClient, RedisFailure

    async def flush() -> None:
        client = RedisClient(url, timeout=2.0)
        try:
            await client.call("FLUSHDB")
        finally:
            await client.close()

    try:
        asyncio.run(flush())
    except RedisFailure:
        return False
    return True


@dataclass
class Options:
    only: tuple[str, ...]
    quick: bool
    warmup: float
    duration: float
    c1_duration: float
    connections: int
    rounds: int
    stream_bytes: int
    lookup_tokens: int
    pg_dsn: str
    results: Path
    keep: bool
    settle: float
    ws_sockets: int = 50
    ws_size: int = 64
    everything: bool = False  # every scenario, full length: a "full run" in the report


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help="run only these scenarios (throughput, streaming, lookups, edge; repeat or comma-separate)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs: 1 s warm-up, 3 s runs, 200 MB, 100k tokens"
    )
    parser.add_argument("--duration", type=float, help="seconds per measured wrk run (default 8; quick 3)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk warm-up (default 2; quick 1)")
    parser.add_argument(
        "--c1-duration", type=float, help="seconds of the 1-connection run (default 5; quick 3)"
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument(
        "--ws-sockets", type=int, default=50, help="edge: WebSocket sockets of the load client (default 50)"
    )
    parser.add_argument(
        "--ws-size", type=int, default=64, help="edge: bytes per WebSocket message (default 64)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds over all servers; each figure is the median round (default 3; quick 1)",
    )
    parser.add_argument(
        "--stream-bytes", type=int, help="bytes per streamed transfer (default 10^9; quick 2*10^8)"
    )
    parser.add_argument(
        "--lookup-tokens", type=int, help="tokens in the lookup stores (default 10^6; quick 10^5)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        help="before each server's runs, wait up to this many seconds for the machine's CPU use "
        "(other people's processes) to drop below 25%% (default 20; quick 5)",
    )
    parser.add_argument("--pg-dsn", default=DEFAULT_PG, help=f"PostgreSQL admin DSN (default {DEFAULT_PG})")
    parser.add_argument(
        "--results",
        type=Path,
        help="where to write the report (default bench/RESULTS.md for a full run, "
        "bench/work/RESULTS.partial.md for --quick or --only)",
    )
    parser.add_argument("--keep", action="store_true", help="keep bench/work/run-*/ (configs, logs, stores)")
    args = parser.parse_args(argv)
    only: list[str] = []
    for value in args.only:
        for part in value.split(","):
            if part.strip() not in SCENARIOS:
                parser.error(f"--only: unknown scenario {part!r} (choose from {', '.join(SCENARIOS)})")
            only.append(part.strip())
    selected = tuple(s for s in SCENARIOS if s in only) if only else SCENARIOS
    quick = bool(args.quick)
    partial = quick or bool(only)
    results = args.results or (
        REPO / "bench" / "work" / "RESULTS.partial.md" if partial else REPO / "bench" / "RESULTS.md"
    )
    return Options(
        only=selected,
        quick=quick,
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 2.0),
        duration=args.duration if args.duration is not None else (3.0 if quick else 8.0),
        c1_duration=args.c1_duration if args.c1_duration is not None else (3.0 if quick else 5.0),
        connections=args.connections,
        rounds=max(1, args.rounds if args.rounds is not None else (1 if quick else 3)),
        stream_bytes=args.stream_bytes or (200_000_000 if quick else 1_000_000_000),
        lookup_tokens=args.lookup_tokens or (100_000 if quick else 1_000_000),
        pg_dsn=args.pg_dsn,
        results=results,
        keep=bool(args.keep),
        settle=args.settle if args.settle is not None else (5.0 if quick else 20.0),
        ws_sockets=max(1, args.ws_sockets),
        ws_size=max(1, args.ws_size),
        everything=not quick and selected == SCENARIOS,
    )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- PostgreSQL databases of this run ------------------------------------------------


class PgDatabases:
    """Fresh `gw_bench_<random>` databases on the PostgreSQL server; all dropped by `drop_all`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.created: list[str] = []
        self.error: str | None = None

    def available(self) -> bool:
        async def probe() -> None:
            connection = await asyncpg.connect(self.dsn, timeout=5)
            await connection.close()

        try:
            asyncio.run(probe())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"
            return False
        return True

    def create(self, suffix: str = "") -> str:
        """Create a database; return its SQLAlchemy URL (postgresql+asyncpg://…)."""
        name = f"gw_bench_{secrets.token_hex(4)}{suffix}"

        async def run() -> None:
            connection = await asyncpg.connect(self.dsn, timeout=5)
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        asyncio.run(run())
        self.created.append(name)
        base = self.dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        return f"{base}/{name}"

    def drop_all(self) -> None:
        async def run(names: list[str]) -> None:
            connection = await asyncpg.connect(self.dsn, timeout=5)
            try:
                for name in names:
                    await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await connection.close()

        if self.created:
            names, self.created = self.created, []
            try:
                asyncio.run(run(names))
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log(f"could not drop {', '.join(names)}: {exc}")
            else:
                log(f"dropped PostgreSQL database(s) {', '.join(names)}")


# -- results -------------------------------------------------------------------------


@dataclass
class ServerRun:
    """The measurements of one server: warm-up, N connections, 1 connection."""

    key: str
    label: str
    c50: WrkResult | None = None
    c1: WrkResult | None = None
    note: str = ""
    c50_rounds: list[WrkResult] = field(default_factory=list)
    c1_rounds: list[WrkResult] = field(default_factory=list)

    def settle_medians(self) -> None:
        """c50/c1 become the median rounds (by req/s, and by p50 latency at 1 connection)."""
        if self.c50_rounds:
            self.c50 = sorted(self.c50_rounds, key=lambda r: r.rps)[len(self.c50_rounds) // 2]
        if self.c1_rounds:
            self.c1 = sorted(self.c1_rounds, key=lambda r: r.lat_p50_ms)[len(self.c1_rounds) // 2]


@dataclass
class Results:
    options: Options
    facts: dict[str, str] = field(default_factory=dict)
    runs: dict[str, ServerRun] = field(default_factory=dict)
    workers2: str = "not run"
    workers2_run: WrkResult | None = None
    streams: list[tuple[str, StreamResult]] = field(default_factory=list)
    stream_note: str = ""
    lookups: list[LookupResult] = field(default_factory=list)
    lookup_notes: list[str] = field(default_factory=list)
    tls_runs: dict[str, ServerRun] = field(default_factory=dict)
    tls_negotiated: dict[str, str] = field(default_factory=dict)
    ws_runs: dict[str, ServerRun] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    configs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0


@dataclass
class ApiKeyCredential:
    """The (j) credential: the bench user's API key (in `setup`) and the access token (a JWT)
    the running gateway last exchanged it for."""

    setup: GatewaySetup
    held: AccessToken | None = None
    obtained: float = 0.0  # time.monotonic() of the exchange

    def token(self) -> str:
        """The access token; exchanged (again) over HTTP when less than TOKEN_MARGIN of it remains."""
        if self.held is None or time.monotonic() - self.obtained > self.held.expires_in - TOKEN_MARGIN:
            fresh = exchange_api_key(self.setup)
            if fresh.expires_in <= TOKEN_MARGIN:
                raise RuntimeError(f"the access token lives {fresh.expires_in:g} s: too short to measure")
            self.held, self.obtained = fresh, time.monotonic()
            log(
                f"exchanged API key {self.setup.key_id} for an access token "
                f"(expires in {fresh.expires_in:g} s, scope {fresh.scope!r})"
            )
        return self.held.token


# -- the run -------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options) -> None:
        self.options = options
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.work = REPO / "bench" / "work" / f"run-{stamp}"
        self.work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # The code measured is this checkout's, whatever copy may be installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.env = env
        self.procs = Processes(self.work, env)
        self.pg = PgDatabases(options.pg_dsn)
        self.results = Results(options)
        self.upstream_port = free_port()
        self.stream_port = free_port()
        self.ws_port = free_port()
        self.setups: dict[str, GatewaySetup | None] = {}
        self.pg_ok: bool | None = None

    # -- helpers

    def command(self, text: str) -> None:
        if text not in self.results.commands:
            self.results.commands.append(text)

    def postgres_ok(self) -> bool:
        if self.pg_ok is None:
            self.pg_ok = self.pg.available()
            if not self.pg_ok:
                self.results.notes.append(f"PostgreSQL at {self.options.pg_dsn} unreachable: {self.pg.error}")
                log(f"PostgreSQL unreachable ({self.pg.error}); its measurements are skipped")
        return self.pg_ok

    def setup(self, store: str) -> GatewaySetup | None:
        """The gateway config for `store` (sqlite|postgresql), with user `bench` and its token."""
        if store not in self.setups:
            if store == "sqlite":
                url = f"sqlite+aiosqlite:///{self.work / 'gw-sqlite' / 'gateway.db'}"
            elif self.postgres_ok():
                url = self.pg.create()
            else:
                self.setups[store] = None
                return None
            setup = write_gateway_config(
                self.work / f"gw-{store}",
                url,
                f"http://{LOOPBACK}:{self.upstream_port}",
                f"http://{LOOPBACK}:{self.stream_port}",
            )
            create_bench_token(setup, self.env)
            for text in setup.commands:
                self.command(text)
            log(f"gateway config for {store}: {setup.config} (store {url.split('@')[-1]})")
            self.setups[store] = setup
            self.results.configs[f"gw-{store}/gateway.yaml"] = setup.config.read_text()
            policy = setup.directory / "policies" / "bench.yaml"
            self.results.configs.setdefault("gw-*/policies/bench.yaml", policy.read_text())
        return self.setups[store]

    def sanity(self, server_url: str, token: str, expect_user: bool, cafile: Path | None = None) -> None:
        """One request before the load: 200, the 98-byte body, and (through a proxy) the identity.

        `cafile`: an https server is verified against the bench's certificate.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, response_headers, body = http_get(server_url + BENCH_PATH, headers, cafile=cafile)
        if status != 200 or body != UPSTREAM_BODY.encode():
            raise RuntimeError(f"sanity check of {server_url}: HTTP {status}, body {body[:200]!r}")
        seen = {k.lower(): v for k, v in response_headers.items()}.get("x-seen-user")
        if expect_user and seen != "bench":
            raise RuntimeError(f"sanity check of {server_url}: the upstream saw X-Service-User {seen!r}")

    def check_assertion(self, server: Server, token: str, *, expected: bool) -> None:
        """Through `server` (a gateway), GET ASSERTION_PATH and check X-Service-User-Assertion.

        `expected`: the upstream got a JWT that verifies against the gateway's JWKS
        (ES256/EdDSA, `typ: gateway-assertion+jwt`, `aud: route:bench`) and names user
        `bench`, GET and this path, so (k) measures real per-request signing; else it got
        none, so (c) is the route without it.
        """
        import jwt  # PyJWT, a dependency of the gateway

        status, headers, _ = http_get(server.url + ASSERTION_PATH, {"Authorization": f"Bearer {token}"})
        seen = {k.lower(): v for k, v in headers.items()}.get("x-seen-assertion")
        where = f"assertion check of {server.url}"
        if status != 200:
            raise RuntimeError(f"{where}: HTTP {status}")
        if not expected:
            if seen:
                raise RuntimeError(f"{where}: the upstream got an assertion on a route without one")
            return
        if not seen:
            raise RuntimeError(f"{where}: the upstream got no X-Service-User-Assertion")
        _, _, body = http_get(f"{server.url}/.gateway/jwks.json")
        keys = {key.key_id: key for key in jwt.PyJWKSet.from_json(body.decode()).keys}
        header = jwt.get_unverified_header(seen)
        if header.get("typ") != "gateway-assertion+jwt" or header.get("kid") not in keys:
            raise RuntimeError(f"{where}: unexpected assertion header {header}")
        claims = jwt.decode(
            seen,
            keys[header["kid"]].key,
            algorithms=["ES256", "EdDSA"],
            audience="route:bench",
            issuer="gateway",
        )
        if (claims.get("sub"), claims.get("method"), claims.get("path")) != ("bench", "GET", ASSERTION_PATH):
            raise RuntimeError(f"{where}: the assertion is for {claims.get('sub')} {claims.get('path')}")

    def measure_round(
        self, run: ServerRun, server: Server, pid: int, token: str, *, round_no: int, shown_as: str = "TOKEN"
    ) -> None:
        """One round of one server: (warm-up on the first round) N connections, then 1 connection.

        `shown_as`: the variable the recorded commands show instead of the token (load.shown).
        """
        options = self.options
        url = server.url + BENCH_PATH
        sut_core = None if run.key == "direct" else int(SUT_CPUS)
        tag = f"{run.label} [round {round_no + 1}/{options.rounds}]"
        waited, busy = wait_until_quiet(QUIET, options.settle)
        settle = f"waited {waited:.0f} s for a quiet machine; CPU use then {busy * 100:.0f} %"
        log(f"{tag}: {settle}")
        if round_no == 0:
            log(f"{tag}: warm-up {options.warmup:g}s")
            run_wrk(
                url, connections=options.connections, duration=options.warmup, token=token, cpus=LOAD_CPUS
            )
        c50 = run_wrk(
            url,
            connections=options.connections,
            duration=options.duration,
            token=token,
            shown_as=shown_as,
            cpus=LOAD_CPUS,
            server_pid=pid,
            sut_core=sut_core,
            load_core=int(LOAD_CPUS),
        )
        c50.settle = settle
        run.c50_rounds.append(c50)
        log(
            f"{tag}: {c50.rps:,.0f} req/s, p50 {c50.lat_p50_ms:.2f} ms, "
            f"p99 {c50.lat_p99_ms:.2f} ms, CPU {c50.cpu_us_per_req or 0:.0f} µs/req"
        )
        c1 = run_wrk(
            url,
            connections=1,
            duration=options.c1_duration,
            token=token,
            shown_as=shown_as,
            cpus=LOAD_CPUS,
            server_pid=pid,
            sut_core=sut_core,
            load_core=int(LOAD_CPUS),
        )
        run.c1_rounds.append(c1)
        log(f"{tag}: 1 connection p50 {c1.lat_p50_ms * 1000:.0f} µs, {c1.rps:,.0f} req/s")
        self.command(c50.command)
        self.command(c1.command)

    # -- scenarios

    def throughput(self) -> None:
        """Every server started at once (each idle while another is loaded), then measured in
        interleaved rounds, so that a slow spell of this shared machine hits them all alike.

        (j) and (k) are measured right after (c) SQLite in each round (their ratios to it are
        the point), though the tables list them last."""
        results = self.results
        upstream = start_nginx_upstream(self.procs, self.work, LOAD_CPUS, self.upstream_port)
        self.command(upstream.proc.command)
        self.results.configs["nginx-upstream.conf"] = (self.work / "nginx-upstream.conf").read_text()
        self.sanity(upstream.url, "", expect_user=False)
        # (run, server, the bearer credential of each round, what the commands show for it)
        measured: list[tuple[ServerRun, Server, Callable[[], str], str]] = []
        started: list[Server] = []

        def add(
            run: ServerRun,
            server: Server,
            token: str | Callable[[], str],
            expect_user: bool,
            shown_as: str = "TOKEN",
        ) -> None:
            credential = token if callable(token) else (lambda: token)
            results.runs[run.key] = run
            self.sanity(server.url, credential(), expect_user=expect_user)
            measured.append((run, server, credential, shown_as))

        try:
            add(
                ServerRun("direct", "(a) upstream direct", note="nginx upstream; shares core 0 with wrk"),
                upstream,
                "",
                False,
            )
            proxy = start_nginx_proxy(self.procs, self.work, SUT_CPUS, self.upstream_port)
            started.append(proxy)
            self.command(proxy.proc.command)
            self.results.configs["nginx-proxy.conf"] = (self.work / "nginx-proxy.conf").read_text()
            add(ServerRun("nginx", "(b) nginx reverse proxy"), proxy, "", False)
            for store, key in (("sqlite", "gw-sqlite"), ("postgresql", "gw-pg")):
                run = ServerRun(key, f"(c) gateway, {'SQLite' if store == 'sqlite' else 'PostgreSQL'} store")
                setup = self.setup(store)
                if setup is None:
                    run.note = "not measured: PostgreSQL unreachable"
                    results.runs[key] = run
                    continue
                gateway = start_gateway(self.procs, setup, SUT_CPUS, key)
                started.append(gateway)
                self.command(shown(gateway.proc.argv, setup.token) + f"  2> {gateway.proc.log_path.name}")
                add(run, gateway, setup.token, True)
                if store == "sqlite":
                    self.check_assertion(gateway, setup.token, expected=False)
                    self.signed_credentials(setup, gateway, started, add)
                    self.rate_limited(setup, started, add)
            sqlite_setup = self.setup("sqlite")
            assert sqlite_setup is not None
            for key, label, client in (
                ("bare", "(d) bare aiohttp proxy", "aiohttp"),
                ("bare-lean", "(e) bare proxy on the gateway's upstream client", "gateway"),
            ):
                bare = start_bare_proxy(
                    self.procs,
                    SUT_CPUS,
                    f"http://{LOOPBACK}:{self.upstream_port}",
                    sqlite_setup.token,
                    client=client,
                )
                started.append(bare)
                self.command(f"BENCH_BARE_TOKENS=$TOKEN=bench {bare.proc.command}")
                add(ServerRun(key, label), bare, sqlite_setup.token, True)
            # Listed after (e), in letter order.
            for key in ("gw-jwt", "gw-assertion", "gw-rl-memory", "gw-rl-redis"):
                if key in results.runs:
                    results.runs[key] = results.runs.pop(key)
            for round_no in range(self.options.rounds):
                for run, server, credential, shown_as in measured:
                    self.measure_round(
                        run, server, server.proc.pid, credential(), round_no=round_no, shown_as=shown_as
                    )
            for run, _, _, _ in measured:
                run.settle_medians()
        finally:
            for server in started:
                self.procs.stop(server.proc)

        self.workers(sqlite_setup)
        self.procs.stop(upstream.proc)

    def signed_credentials(
        self,
        setup: GatewaySetup,
        gateway: Server,
        started: list[Server],
        add: Callable[..., None],
    ) -> None:
        """(j) and (k), beside the running (c) SQLite gateway `gateway` of `setup`.

        (j): that same process, the credential an access token (a JWT) for which an API key of
        user `bench` was exchanged at its token endpoint: the difference to (c) is the JWT path
        alone (signature verified once, then the per-process claims cache and the key's cached
        state). (k): a second process on the same store and `gw_` token whose `bench` route
        has `assertion: true`, so each forwarded request is signed (ES256); its config differs
        from (c)'s only in that and in naming (c)'s sealing secret, which the first start on
        the fresh store wrote.
        """
        results = self.results
        create_bench_key(setup, self.env)
        self.command(setup.commands[-1])
        credential = ApiKeyCredential(setup)
        exchange = [
            "curl", "-sS", "-d", "grant_type=client_credentials", "-d", f"client_id={setup.key_id}",
            "--data-urlencode", f"client_secret={setup.key_secret}", token_endpoint_url(setup),
        ]  # fmt: skip
        self.command(
            shown(exchange, setup.key_secret, "KEY_SECRET") + "  # ACCESS_TOKEN = the answer's access_token"
        )
        add(
            ServerRun(
                "gw-jwt",
                "(j) gateway, SQLite, access-token JWT",
                note="the (c) SQLite process; Bearer JWT from POST /.gateway/token",
            ),
            gateway,
            credential.token,
            True,
            "ACCESS_TOKEN",
        )
        assertion_setup = write_gateway_config(
            self.work / "gw-sqlite-assertion",
            setup.store_url,
            f"http://{LOOPBACK}:{self.upstream_port}",
            f"http://{LOOPBACK}:{self.stream_port}",
            assertion=True,
            secret_key_file=setup.directory / "gateway.secret",
        )
        assertion_setup.token = setup.token
        results.configs["gw-sqlite-assertion/gateway.yaml"] = assertion_setup.config.read_text()
        signer = start_gateway(self.procs, assertion_setup, SUT_CPUS, "gw-sqlite-assertion")
        started.append(signer)
        self.command(shown(signer.proc.argv, setup.token) + f"  2> {signer.proc.log_path.name}")
        log(f"gateway config with `assertion: true`: {assertion_setup.config} (the SQLite store of (c))")
        self.check_assertion(signer, setup.token, expected=True)
        add(
            ServerRun(
                "gw-assertion",
                "(k) gateway, SQLite, `assertion: true`",
                note="route bench signs an ES256 assertion per request",
            ),
            signer,
            setup.token,
            True,
        )

    def rate_limited(self, setup: GatewaySetup, started: list[Server], add: Callable[..., None]) -> None:
        """(l) and (m): two more processes on (c) SQLite's store and token whose configs add
        `rate_limits` (per_user, auth_failures and the route's limit, far above any rate
        reached) on the memory store and on the real Redis (database 3, emptied first)."""
        results = self.results
        for key, label, store in (
            ("gw-rl-memory", "(l) gateway, SQLite, rate limits in memory", "memory"),
            ("gw-rl-redis", "(m) gateway, SQLite, rate limits on Redis", BENCH_REDIS),
        ):
            if store != "memory" and not redis_ready(store):
                results.runs[key] = ServerRun(key, label, note=f"not measured: Redis at {store} unreachable")
                continue
            limited = write_gateway_config(
                self.work / key,
                setup.store_url,
                f"http://{LOOPBACK}:{self.upstream_port}",
                f"http://{LOOPBACK}:{self.stream_port}",
                secret_key_file=setup.directory / "gateway.secret",
                rate_limit_store=store,
            )
            limited.token = setup.token
            results.configs[f"{key}/gateway.yaml"] = limited.config.read_text()
            server = start_gateway(self.procs, limited, SUT_CPUS, key)
            started.append(server)
            self.command(shown(server.proc.argv, setup.token) + f"  2> {server.proc.log_path.name}")
            add(ServerRun(key, label, note=f"rate_limits.store: {store}"), server, setup.token, True)

    def workers(self, setup: GatewaySetup) -> None:
        """`gateway serve --workers auto` (one per core: 2 here): measured (both cores) when it
        starts, else 'not available'."""
        results = self.results
        argv = gateway_serve_argv(setup, workers="auto")
        self.command(shown(argv, setup.token))
        proc = self.procs.start("gw-workers2", argv, cwd=REPO)
        deadline = time.monotonic() + 30
        ready = False
        while time.monotonic() < deadline and proc.alive():
            status, _, _ = _try_get(f"http://{LOOPBACK}:{setup.admin_port}/readyz")
            if status == 200:
                ready = True
                break
            time.sleep(0.2)
        if not ready:
            self.procs.stop(proc)
            reason = " ".join(proc.log_tail(3).split())[:300] or f"exit code {proc.popen.returncode}"
            results.workers2 = f"not available (`gateway serve --workers auto` failed: {reason})"
            log(f"--workers auto: {results.workers2}")
            return
        try:
            self.sanity(f"http://{LOOPBACK}:{setup.proxy_port}", setup.token, expect_user=True)
            url = f"http://{LOOPBACK}:{setup.proxy_port}{BENCH_PATH}"
            options = self.options
            wait_until_quiet(QUIET, options.settle)
            run_wrk(url, connections=options.connections, duration=options.warmup, token=setup.token)
            workers = child_pids(proc.pid)
            before = {pid: cpu_ticks(pid) for pid in workers}
            started = time.monotonic()
            result = run_wrk(
                url,
                connections=options.connections,
                duration=options.duration,
                token=setup.token,
                cpus=LOAD_CPUS,
                server_pid=proc.pid,
            )
            elapsed = time.monotonic() - started
            hz = os.sysconf("SC_CLK_TCK")
            shares = [
                f"worker {index}: {(cpu_ticks(pid) - before[pid]) / hz / elapsed * 100:.0f} % of a core"
                for index, pid in enumerate(workers)
            ]
            results.workers2_run = result
            results.workers2 = (
                f"{len(workers)} workers; measured unpinned (they may use both cores, so they share "
                "core 0 with wrk and the upstream); CPU µs/req is that of the whole process tree; "
                "per worker over the run: "
                + ", ".join(shares)
            )
            log(f"--workers auto: {result.rps:,.0f} req/s, p99 {result.lat_p99_ms:.2f} ms")
        finally:
            self.procs.stop(proc)

    def streaming(self) -> None:
        results = self.results
        options = self.options
        setup = self.setup("sqlite")
        assert setup is not None
        upstream = start_stream_upstream(self.procs, LOAD_CPUS, self.stream_port)
        self.command(upstream.proc.command)
        gateway = start_gateway(self.procs, setup, SUT_CPUS, "gw-stream")
        self.command(shown(gateway.proc.argv, setup.token) + f"  2> {gateway.proc.log_path.name}")
        upload_file = self.work / "upload.bin"
        with upload_file.open("wb") as handle:
            handle.truncate(options.stream_bytes)  # sparse: reading it costs no disk I/O
        try:
            size = options.stream_bytes
            # Direct, the client takes core 1 (free then), so that client and upstream do not
            # share a core: the rows show what they can do without the gateway in between.
            for label, base, pid, core, client_cpus in (
                ("direct (no gateway)", upstream.url, upstream.proc.pid, None, SUT_CPUS),
                ("through the gateway", gateway.url, gateway.proc.pid, int(SUT_CPUS), LOAD_CPUS),
            ):
                for direction in ("download", "upload"):
                    wait_until_quiet(QUIET, self.options.settle)
                    url = f"{base}/stream/{direction}"
                    if direction == "download":
                        url += f"?bytes={size}"
                    log(f"streaming {direction} of {size / 1e6:,.0f} MB {label}")
                    result = run_curl_stream(
                        direction,
                        url,
                        token=setup.token,
                        size=size,
                        gateway_pid=pid,
                        cpus=client_cpus,
                        upload_file=upload_file if direction == "upload" else None,
                        sut_core=core,
                    )
                    results.streams.append((label, result))
                    self.command(result.command)
                    log(
                        f"  {result.mb_per_s:,.0f} MB/s, peak RSS {result.peak_rss_mb:.1f} MB "
                        f"(baseline {result.baseline_rss_mb:.1f} MB)"
                    )
        finally:
            upload_file.unlink(missing_ok=True)
            self.procs.stop(gateway.proc)
            self.procs.stop(upstream.proc)

    def lookups(self) -> None:
        results = self.results
        count = self.options.lookup_tokens
        stores: list[tuple[str, str]] = [("SQLite", f"sqlite+aiosqlite:///{self.work / 'lookups.db'}")]
        if self.postgres_ok():
            stores.append(("PostgreSQL", self.pg.create("_lookups")))
        else:
            results.lookup_notes.append("PostgreSQL: not measured (unreachable)")
        for label, url in stores:
            log(f"lookups on {label}: filling {count:,} tokens")
            result = _run_async(
                measure(url, label, count, before_timing=lambda: wait_until_quiet(QUIET, self.options.settle))
            )
            results.lookups.append(result)
            log(
                f"  filled in {result.fill.seconds:.1f}s; known p50 {result.known_p50_ms:.2f} ms "
                f"p99 {result.known_p99_ms:.2f} ms; unknown p50 {result.unknown_p50_ms:.2f} ms "
                f"p99 {result.unknown_p99_ms:.2f} ms"
            )
        (self.work / "lookups.db").unlink(missing_ok=True)

    def edge_setups(self, pair: TlsPair) -> tuple[GatewaySetup, GatewaySetup]:
        """Two gateway configs that differ only in the proxy listener (plain HTTP / TLS with
        `pair`), each with the routes `bench`, `stream` and `ws` (`websocket: true`). They share
        one SQLite store, so one token serves both, and so the TLS one names the sealing secret
        the plain one writes on its first start (else it cannot open the store's signing key)."""
        store = f"sqlite+aiosqlite:///{self.work / 'gw-edge' / 'gateway.db'}"
        upstreams = (f"http://{LOOPBACK}:{self.upstream_port}", f"http://{LOOPBACK}:{self.stream_port}")
        ws_upstream = f"http://{LOOPBACK}:{self.ws_port}"
        plain = write_gateway_config(self.work / "gw-edge", store, *upstreams, ws_upstream=ws_upstream)
        create_bench_token(plain, self.env)
        tls = write_gateway_config(
            self.work / "gw-edge-tls",
            store,
            *upstreams,
            tls=pair,
            ws_upstream=ws_upstream,
            secret_key_file=plain.directory / "gateway.secret",
        )
        tls.token = plain.token
        for text in plain.commands:
            self.command(text)
        for setup in (plain, tls):
            self.results.configs[f"{setup.directory.name}/gateway.yaml"] = setup.config.read_text()
        self.results.configs["gw-edge*/policies/ws.yaml"] = (
            plain.directory / "policies" / "ws.yaml"
        ).read_text()
        log(f"gateway configs for edge: {plain.config}, {tls.config} (one SQLite store)")
        return plain, tls

    def measure_ws_round(self, run: ServerRun, url: str, pid: int, token: str, *, round_no: int) -> None:
        """One round of WebSocket round trips: N sockets, then 1 socket (the latency one client sees)."""
        options = self.options
        sut_core = None if run.key == "ws-direct" else int(SUT_CPUS)
        tag = f"{run.label} [round {round_no + 1}/{options.rounds}]"
        waited, busy = wait_until_quiet(QUIET, options.settle)
        settle = f"waited {waited:.0f} s for a quiet machine; CPU use then {busy * 100:.0f} %"
        log(f"{tag}: {settle}")
        for sockets, duration, warmup, rounds in (
            (options.ws_sockets, options.duration, options.warmup, run.c50_rounds),
            (1, options.c1_duration, min(options.warmup, 0.5), run.c1_rounds),
        ):
            result = run_ws_load(
                url,
                sockets=sockets,
                duration=duration,
                warmup=warmup,
                env=self.env,
                token=token,
                size=options.ws_size,
                cpus=LOAD_CPUS,
                server_pid=pid,
                sut_core=sut_core,
                load_core=int(LOAD_CPUS),
            )
            result.settle = settle
            rounds.append(result)
            self.command(result.command)
            log(
                f"{tag}: {sockets} socket(s): {result.rps:,.0f} round trips/s, p50 "
                f"{result.lat_p50_ms * 1000:.0f} µs, p99 {result.lat_p99_ms * 1000:.0f} µs, server CPU "
                f"{result.cpu_us_per_req or 0:.0f} µs/round trip, load core "
                f"{(result.raw.get('load_core_busy') or 0) * 100:.0f} % busy, errors {result.error_count}"
                + (f" ({result.raw['first_error']})" if result.raw.get("first_error") else "")
            )

    def edge(self) -> None:
        """TLS termination (gateway vs nginx, each against its own plain-HTTP figure) and
        WebSocket round trips (direct vs through the gateway), every server started at once and
        measured in interleaved rounds, like the throughput scenario, so the ratios come from
        one sitting."""
        results = self.results
        upstream = start_nginx_upstream(self.procs, self.work, LOAD_CPUS, self.upstream_port)
        self.command(upstream.proc.command)
        results.configs.setdefault("nginx-upstream.conf", (self.work / "nginx-upstream.conf").read_text())
        started: list[Server] = [upstream]
        try:
            ws_upstream = start_ws_upstream(self.procs, LOAD_CPUS, self.ws_port)
            started.append(ws_upstream)
            self.command(ws_upstream.proc.command)
            pair = write_self_signed_pair(self.work / "tls")
            self.command(
                "# the TLS pair: made with `cryptography` (write_self_signed_pair); the same as\n"
                f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {pair.key} "
                f"-out {pair.cert} -days 90 -subj /CN=gateway-bench "
                "-addext subjectAltName=DNS:localhost,IP:127.0.0.1"
            )
            plain_setup, tls_setup = self.edge_setups(pair)
            token = plain_setup.token
            measured: list[tuple[ServerRun, Callable[[int], None]]] = []

            def http(run: ServerRun, server: Server, token: str, expect_user: bool) -> None:
                results.tls_runs[run.key] = run
                self.sanity(server.url, token, expect_user, cafile=pair.cert)
                if server.scheme == "https":
                    results.tls_negotiated[run.label] = tls_probe(server.port, pair.cert)
                measured.append(
                    (run, lambda n: self.measure_round(run, server, server.pid, token, round_no=n))
                )

            proxy = start_nginx_proxy(self.procs, self.work, SUT_CPUS, self.upstream_port)
            started.append(proxy)
            self.command(proxy.proc.command)
            results.configs.setdefault("nginx-proxy.conf", (self.work / "nginx-proxy.conf").read_text())
            http(ServerRun("nginx", "(b) nginx reverse proxy, plain HTTP"), proxy, "", False)
            proxy_tls = start_nginx_proxy(self.procs, self.work, SUT_CPUS, self.upstream_port, tls=pair)
            started.append(proxy_tls)
            self.command(proxy_tls.proc.command)
            results.configs["nginx-proxy-tls.conf"] = (self.work / "nginx-proxy-tls.conf").read_text()
            http(ServerRun("nginx-tls", "(g) nginx terminating TLS"), proxy_tls, "", False)
            gateways: dict[str, Server] = {}
            for key, label, setup in (
                ("gw", "(c) gateway, SQLite, plain HTTP", plain_setup),
                ("gw-tls", "(f) gateway, SQLite, TLS", tls_setup),
            ):
                gateway = start_gateway(self.procs, setup, SUT_CPUS, f"gw-edge-{key}")
                started.append(gateway)
                gateways[key] = gateway
                self.command(shown(gateway.proc.argv, token) + f"  2> {gateway.proc.log_path.name}")
                http(ServerRun(key, label), gateway, token, True)

            def websocket(run: ServerRun, url: str, pid: int, token: str) -> None:
                results.ws_runs[run.key] = run
                _run_async(ws_sanity(url, token, "bench" if token else ""))
                measured.append((run, lambda n: self.measure_ws_round(run, url, pid, token, round_no=n)))

            websocket(
                ServerRun(
                    "ws-direct", "(h) WebSocket echo upstream direct", note="shares core 0 with the client"
                ),
                f"ws://{LOOPBACK}:{self.ws_port}{WS_PATH}",
                ws_upstream.pid,
                "",
            )
            websocket(
                ServerRun("ws-gw", "(i) through the gateway (SQLite, plain HTTP)"),
                f"ws://{LOOPBACK}:{plain_setup.proxy_port}{WS_PATH}",
                gateways["gw"].pid,
                token,
            )
            for round_no in range(self.options.rounds):
                for _, measure_one in measured:
                    measure_one(round_no)
            for run, _ in measured:
                run.settle_medians()
        finally:
            for server in reversed(started):
                self.procs.stop(server.proc)

    def run(self) -> Results:
        self.results.facts = facts(self.options)
        log(f"work directory {self.work}")
        scenarios: dict[str, Callable[[], None]] = {
            "throughput": self.throughput,
            "streaming": self.streaming,
            "lookups": self.lookups,
            "edge": self.edge,
        }
        for name in self.options.only:
            load_before = _loadavg()
            scenarios[name]()
            self.results.notes.append(f"{name}: load average {load_before} before, {_loadavg()} after")
        self.results.elapsed_s = time.monotonic() - self.results.started
        return self.results

    def close(self, ok: bool) -> None:
        self.procs.stop_all()
        self.pg.drop_all()
        if ok and not self.options.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"kept {self.work}")


def _try_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        return http_get(url, timeout=1)
    except OSError:
        return 0, {}, b""


def _run_async(coroutine: Any) -> Any:
    """Run `coroutine` on uvloop when installed (the loop `gateway serve` uses)."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def facts(options: Options) -> dict[str, str]:
    """Date and machine facts for the report."""
    git = ["git", "-C", str(REPO)]
    commit = _version([*git, "rev-parse", "HEAD"])
    dirty = _version([*git, "status", "--porcelain", "--untracked-files=no"])
    dirty_note = "" if dirty in ("", "?") else " (with uncommitted changes)"

    async def pg_version() -> str:
        connection = await asyncpg.connect(options.pg_dsn, timeout=5)
        try:
            return str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()

    try:
        postgres = asyncio.run(pg_version())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        postgres = f"unreachable ({exc.__class__.__name__})"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git commit": commit + dirty_note,
        "nproc": str(os.cpu_count()),
        "CPU model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _package_version("aiohttp"),
        "uvloop": _package_version("uvloop"),
        "SQLAlchemy": _package_version("sqlalchemy"),
        "asyncpg / aiosqlite": f"{_package_version('asyncpg')} / {_package_version('aiosqlite')}",
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]).split(" Copyright")[0],
        "curl": _version(["curl", "--version"]).split(" (")[0],
        "OpenSSL (wrk, nginx) / Python's ssl": f"{_version(['openssl', 'version'])} / {ssl.OPENSSL_VERSION}",
        "PostgreSQL server": postgres,
        "load average at start": _loadavg(),
    }


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run through the normal `finally` cleanup."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (load on core 0, the server under test on core 1)", file=sys.stderr)
        return 2
    for tool in ("nginx", "wrk", "taskset", "curl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (bench/run.sh installs it)", file=sys.stderr)
            return 2
    bench = Bench(options)
    ok = False
    with _terminate_as_exit():
        try:
            results = bench.run()
            ok = True
        finally:
            bench.close(ok)
    text = report.render(results, previous=options.results)
    options.results.parent.mkdir(parents=True, exist_ok=True)
    options.results.write_text(text)
    log(f"wrote {options.results} ({results.elapsed_s:.0f}s)")
    print(report.summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
