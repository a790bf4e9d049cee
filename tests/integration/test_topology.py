"""The deployment topology, without Docker: nginx in front of two `gateway serve` instances on one
PostgreSQL store (README "Freshness, outages and several instances", "Deployment", "Shutdown and drain").

Real parts only: a fresh database on the real PostgreSQL, the real echo upstream, two real
`gateway serve` processes (one worker each) on the same config file, and a real nginx
(/usr/sbin/nginx) balancing over both with keep-alive upstream connections. Under steady load
from concurrent clients this proves that

- a token expired through one instance's admin API is refused on every path (through nginx,
  directly on that instance, directly on the other) within 1 s of the API's answer, and at once
  on the instance that made the change; nothing else (no 5xx, no connection error) happens;
- SIGTERM to one instance drains it without a single failed request through nginx: its answers
  say `Connection: close` during `drain_delay`, then its listener closes and nginx's
  `proxy_next_upstream error` sends what would have gone to it to the other instance; it exits 0.

The nginx config (`nginx_conf`) is the one we recommend: see its comments for each choice.
Under CI a missing nginx or PostgreSQL fails the test; elsewhere it skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import load_config
from gateway.keyring import open_ring
from gateway.policy import load_route_table
from gateway.services import Directory
from gateway.store import open_store
from tests.conftest import IN_CI, fresh_pg_database, write_config
from tests.process import GatewayProcess, free_port, stop_process, until_listening

NGINX = "/usr/sbin/nginx"
READY_SECONDS = 10.0
STOP_SECONDS = 5.0
DRAIN_DELAY = 1.0
SHUTDOWN_TIMEOUT = 5.0
EXTRA_YAML = (
    'trusted_proxies: ["127.0.0.1/32"]\n'  # nginx's X-Forwarded-For is kept
    f"shutdown: {{drain_delay: {DRAIN_DELAY:g}, timeout: {SHUTDOWN_TIMEOUT:g}}}\n"
)
REVOCATION_BOUND = 1.0  # README "Freshness": a change applies everywhere within a second
CLIENTS_THROUGH_NGINX = 8
CLIENTS_PER_INSTANCE = 2
MAX_REQUESTS_PER_CLIENT = 5000  # a bound besides the time: no loop runs unbounded
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
LOAD_PATH = "/echo/topology"


# --- nginx ------------------------------------------------------------------------------------


def nginx_unavailable() -> None:
    """Fail under CI (.ci/run installs nginx-light), skip elsewhere."""
    message = f"{NGINX} is needed (Debian package nginx-light)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def nginx_conf(directory: Path, port: int, gateways: list[int]) -> str:
    """A minimal nginx.conf keeping every file in `directory`, balancing over `gateways`' proxy ports.

    The `upstream` and `location` blocks are the recommended load-balancer config:

    - `keepalive` (with `proxy_http_version 1.1` and an empty `Connection` header): nginx reuses
      connections to the gateways. A draining gateway answers `Connection: close`, so nginx does
      not put that connection back in its pool.
    - `proxy_next_upstream error timeout` (nginx's default, spelt out): `error` covers a gateway
      that stopped accepting after `drain_delay` (connection refused) and a cached keep-alive
      connection the gateway closed as idle just as nginx reused it; nginx then sends the request
      to the other gateway. `http_502`/`http_503` are left out on purpose: a gateway's 502 is its
      upstream failing (the other gateway reaches the same upstream), and a 503 passes on the
      upstream's own 503 or says the shared store is down; retrying those doubles the load and
      hides the answer.
    - `X-Forwarded-For $proxy_add_x_forwarded_for`: kept by the gateways (`trusted_proxies`).
    - nginx OSS has no active health checks, so it cannot probe `/readyz`; the drain does not
      need it (see the module docstring).
    """
    # Run as whoever runs the tests: as root, nginx would otherwise switch its workers to www-data.
    user = "user root;\n" if os.geteuid() == 0 else ""
    servers = "".join(f"        server 127.0.0.1:{gateway};\n" for gateway in gateways)
    return f"""\
{user}daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format topology '$msec $status "$upstream_addr" "$upstream_status" $request_time';
    access_log {directory}/access.log topology;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;

    # --- recommended load-balancer config ---
    upstream gateways {{
{servers}        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
        }}
    }}
    # --- end ---
}}
"""


class Nginx:
    """nginx as a child process (not a daemon) on a free loopback port; stop() ends it."""

    def __init__(self, directory: Path, gateways: list[int]) -> None:
        directory.mkdir()
        self.directory = directory
        self.port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(nginx_conf(directory, self.port, gateways))
        self._log = (directory / "nginx.log").open("wb")
        self.process = subprocess.Popen(
            [NGINX, "-p", f"{directory}/", "-e", "stderr", "-c", str(conf)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        self._log.flush()
        parts = [(self.directory / "nginx.log").read_text(errors="replace")]
        error_log = self.directory / "error.log"
        if error_log.exists():
            parts.append(error_log.read_text(errors="replace"))
        return "".join(parts)

    def access(self) -> list[tuple[int, str, str]]:
        """Each access-log line: (status, $upstream_addr, $upstream_status)."""
        lines = (self.directory / "access.log").read_text().splitlines()
        found = (re.fullmatch(r'\S+ (\d+) "([^"]*)" "([^"]*)" \S+', line) for line in lines)
        return [(int(m[1]), m[2], m[3]) for m in found if m]

    async def wait_ready(self) -> None:
        """Poll the port until it accepts a connection (bounded; fails on an early exit)."""
        await until_listening(self.port, self.process, self.logs, READY_SECONDS)

    def stop(self) -> None:
        stop_process(self.process, STOP_SECONDS)
        self._log.close()


# --- the topology -----------------------------------------------------------------------------


@dataclass
class Topology:
    nginx: Nginx
    a: GatewayProcess
    b: GatewayProcess
    token: str  # user `svc` (role writer), token `t`
    admin_token: str  # admin identity `root`


async def identities(config: Path) -> tuple[str, str]:
    """Migrate the store of `config`, make its first signing key (as `gateway serve --workers N`
    does once in its parent), and create the service user `svc` (role writer, token `t`) and the
    admin identity `root`: (svc's token, root's token).

    Through the store alone, not Gateway.open()/close() (as tests.process.writer_token does): that
    starts and cancels a change feed and a LISTEN task for nothing, and on Python 3.11 the close
    can hang when the notification of these very writes arrives just as it cancels the feed."""
    loaded = load_config(config, env={})
    store = await open_store(loaded.store_url, migrate=True)
    try:
        await open_ring(store, loaded, os.environ)
        table = load_route_table(loaded)
        directory = Directory(store, lambda: table)
        await directory.create_user("svc", actor="test", roles=["writer"])
        _, token = await directory.create_token("svc", "t", actor="test")
        await directory.create_user("root", actor="test", admin=True)
        _, admin = await directory.create_token("root", "adm", actor="test")
    finally:
        await store.close()
    return token, admin


async def stop_all(processes: list[GatewayProcess]) -> None:
    """SIGTERM every process still running and wait (polling, so the upstream in this event loop
    keeps serving) for it to drain; then stop(), which ends whatever is left at once."""
    for process in processes:
        if process.process.poll() is None:
            process.signal(signal.SIGTERM)
    deadline = time.monotonic() + DRAIN_DELAY + SHUTDOWN_TIMEOUT + 2
    while time.monotonic() < deadline and any(p.process.poll() is None for p in processes):
        await asyncio.sleep(0.05)
    for process in processes:
        process.stop()


@contextlib.asynccontextmanager
async def topology(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Topology]:
    """nginx → two gateway instances → the upstream, on a fresh PostgreSQL database."""
    if not os.access(NGINX, os.X_OK):
        nginx_unavailable()
    async with fresh_pg_database() as store_url:
        config = write_config(
            tmp_path,
            store_url=store_url,
            upstream_url=str(upstream.make_url("")).rstrip("/"),
            extra_yaml=EXTRA_YAML,
        )
        token, admin = await identities(config)
        started: list[GatewayProcess] = []
        nginx: Nginx | None = None
        try:
            started.append(GatewayProcess(config))
            started.append(GatewayProcess(config))
            a, b = started
            await asyncio.gather(a.wait_ready(), b.wait_ready())
            nginx = Nginx(tmp_path / "nginx", [a.proxy_port, b.proxy_port])
            await nginx.wait_ready()
            yield Topology(nginx, a, b, token, admin)
        finally:
            if nginx is not None:
                nginx.stop()
            await stop_all(started)


# --- load -------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request of the load: where it went, when it was sent and answered, what came back."""

    path: str  # "nginx", "A" or "B"
    sent: float  # time.monotonic()
    answered: float
    status: int | None  # None: no HTTP answer (see `error`)
    error: str | None  # the refusal code of a non-200, or the client exception


def describe(samples: list[Sample], since: float, limit: int = 5) -> str:
    shown = [
        f"{s.path} sent {s.sent - since:+.3f}s answered {s.answered - since:+.3f}s: {s.status} {s.error}"
        for s in samples[:limit]
    ]
    more = f" (and {len(samples) - limit} more)" if len(samples) > limit else ""
    return "; ".join(shown) + more


async def load(
    session: aiohttp.ClientSession, base: str, path: str, token: str, stop: asyncio.Event, out: list[Sample]
) -> None:
    """GET the echo route with `token` back to back until `stop` (or MAX_REQUESTS_PER_CLIENT)."""
    headers = {"Authorization": f"Bearer {token}"}
    for number in range(MAX_REQUESTS_PER_CLIENT):
        if stop.is_set():
            return
        sent = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            url = f"{base}{LOAD_PATH}/{path}/{number}"
            async with session.get(url, headers=headers, timeout=REQUEST_TIMEOUT) as response:
                body = await response.read()
                status = response.status
                if status != 200:
                    try:
                        error = str(json.loads(body).get("error"))
                    except ValueError:
                        error = body[:200].decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        out.append(Sample(path, sent, time.monotonic(), status, error))
        await asyncio.sleep(0)  # let the upstream (in this loop) and the other clients run


def failures(samples: list[Sample], allowed: frozenset[int]) -> list[Sample]:
    return [s for s in samples if s.status not in allowed]


def access_times(process: GatewayProcess) -> list[float]:
    """The wall-clock times (epoch seconds) of `process`'s access-log lines."""
    times = []
    for line in process.logs().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "request":
                times.append(datetime.fromisoformat(record["ts"]).timestamp())
    return times


async def check_forwarded_for_kept(session: aiohttp.ClientSession, topo: Topology) -> None:
    """A client's X-Forwarded-For reaches the upstream through nginx and a gateway (trusted_proxies)."""
    headers = {"Authorization": f"Bearer {topo.token}", "X-Forwarded-For": "198.51.100.7"}
    async with session.get(f"{topo.nginx.url}{LOAD_PATH}/xff", headers=headers) as response:
        assert response.status == 200, (response.status, await response.text())
        echo = await response.json()
    forwarded = [value for name, value in echo["headers"] if name.lower() == "x-forwarded-for"]
    assert forwarded and forwarded[0].startswith("198.51.100.7,"), forwarded


# --- revocation -------------------------------------------------------------------------------


async def test_revocation_through_one_instance_reaches_every_path_within_a_second_under_load(
    tmp_path: Path, upstream: TestServer
) -> None:
    async with topology(tmp_path, upstream) as topo:
        async with contextlib.AsyncExitStack() as stack:
            sessions = {
                name: await stack.enter_async_context(aiohttp.ClientSession())
                for name in ("nginx", "A", "B", "admin")
            }
            await check_forwarded_for_kept(sessions["nginx"], topo)
            bases = {"nginx": topo.nginx.url, "A": topo.a.proxy, "B": topo.b.proxy}
            clients = {"nginx": CLIENTS_THROUGH_NGINX, "A": CLIENTS_PER_INSTANCE, "B": CLIENTS_PER_INSTANCE}
            samples: list[Sample] = []
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(load(sessions[path], bases[path], path, topo.token, stop, samples))
                for path, count in clients.items()
                for _ in range(count)
            ]
            try:
                await asyncio.sleep(1.5)  # steady load, every identity cached on both instances
                asked = time.monotonic()
                async with sessions["admin"].post(
                    f"{topo.a.admin}/v1/service-users/svc/tokens/t/expire",
                    headers={"Authorization": f"Bearer {topo.admin_token}"},
                ) as response:
                    expired = await response.json()
                answered = time.monotonic()
                assert response.status == 200 and expired["expired"] is True, (response.status, expired)
                await asyncio.sleep(REVOCATION_BOUND + 1.0)  # well past the bound, load still running
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)

    report = [f"revoke call took {answered - asked:.3f}s; {len(samples)} requests"]
    bad = failures(samples, frozenset({200, 401}))
    assert not bad, f"{len(bad)} requests neither 200 nor 401: {describe(bad, answered)}"
    before = [s for s in samples if s.answered < asked]
    refused_before = failures(before, frozenset({200}))
    assert not refused_before, f"refused before the revocation: {describe(refused_before, answered)}"
    wrong_code = [s for s in samples if s.status == 401 and s.error != "token_expired"]
    assert not wrong_code, f"401 for another reason than token_expired: {describe(wrong_code, answered)}"

    for path in clients:
        mine = [s for s in samples if s.path == path]
        warm = [s for s in mine if s.answered < asked]
        late = [s for s in mine if s.sent >= answered + REVOCATION_BOUND]
        assert len(warm) >= 10 and len(late) >= 10, (
            f"{path}: too little load to judge ({len(warm)} before, {len(late)} after the bound)"
        )
        refused = [s.answered - answered for s in mine if s.status == 401]
        assert refused, f"{path}: never refused"
        # A 200 to a request sent after the API answered: its decision was made after the change.
        accepted_after = [s for s in mine if s.status == 200 and s.sent >= answered]
        last = max((s.answered - answered for s in accepted_after), default=None)
        report.append(
            f"{path}: {len(mine)} requests, first 401 at {min(refused):+.3f}s, "
            + (f"last 200 (sent after the answer) at {last:+.3f}s" if last is not None else "no 200 after")
            + f" ({len(accepted_after)} such 200s)"
        )
        if path == "A":  # the instance that made the change: at once
            assert not accepted_after, (
                f"A accepted {len(accepted_after)} requests sent after its API answered: "
                f"{describe(accepted_after, answered)}"
            )
        assert last is None or last < REVOCATION_BOUND, (
            f"{path}: a 200 answered {last:.3f}s after the revocation answer (bound {REVOCATION_BOUND}s): "
            f"{describe([s for s in accepted_after if s.answered - answered >= REVOCATION_BOUND], answered)}"
        )
        if path != "nginx":  # one instance: once refused, never accepted again (nginx mixes A and B)
            first_refusal = answered + min(refused)
            again = [s for s in mine if s.status == 200 and s.sent >= first_refusal]
            assert not again, f"{path}: accepted again after refusing: {describe(again, answered)}"
    print("\n".join(report))


# --- SIGTERM under load -----------------------------------------------------------------------


async def test_sigterm_to_one_instance_under_load_fails_no_request_through_nginx(
    tmp_path: Path, upstream: TestServer
) -> None:
    async with topology(tmp_path, upstream) as topo:
        # Half the clients keep their connection to nginx alive, half open one per request.
        async with (
            aiohttp.ClientSession() as keepalive,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
        ):
            samples: list[Sample] = []
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(
                    load(keepalive if n % 2 else fresh, topo.nginx.url, "nginx", topo.token, stop, samples)
                )
                for n in range(CLIENTS_THROUGH_NGINX)
            ]
            try:
                await asyncio.sleep(1.5)  # steady load over both instances
                signalled_wall, signalled = time.time(), time.monotonic()
                topo.b.signal(signal.SIGTERM)
                within = DRAIN_DELAY + SHUTDOWN_TIMEOUT + 2.0
                while topo.b.process.poll() is None and time.monotonic() - signalled < within:
                    await asyncio.sleep(0.02)
                exited = time.monotonic() - signalled
                code = topo.b.process.poll()
                await asyncio.sleep(1.5)  # and on, through A alone
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
        b_logs = topo.b.logs()
        access = topo.nginx.access()
        nginx_logs = topo.nginx.logs()
        b_times = access_times(topo.b)

    gone = signalled + exited
    bad = failures(samples, frozenset({200}))
    retried = [line for line in access if "," in line[1]]
    b_address = f"127.0.0.1:{topo.b.proxy_port}"
    report = (
        f"{len(samples)} requests through nginx "
        f"({sum(s.sent < signalled for s in samples)} before the signal, "
        f"{sum(signalled <= s.sent < gone for s in samples)} while B drained, "
        f"{sum(s.sent >= gone for s in samples)} after B exited); "
        f"B served {sum(t < signalled_wall for t in b_times)} before the signal and "
        f"{sum(t >= signalled_wall for t in b_times)} after; B exited {code} after {exited:.2f}s; "
        f"nginx sent {sum(b_address in line[1] for line in access)} requests to B, "
        f"retried {len(retried)} on the other instance: {Counter(line[2] for line in retried)}"
    )
    print(report)
    assert not bad, (
        f"{len(bad)} of {len(samples)} requests failed through nginx: {describe(bad, signalled)}\n"
        f"{report}\nnginx:\n{nginx_logs[-3000:]}"
    )
    assert code == 0, f"B: exit {code} after {exited:.2f}s:\n{b_logs[-3000:]}"
    assert exited < DRAIN_DELAY + SHUTDOWN_TIMEOUT + 1.0, report
    assert exited >= DRAIN_DELAY - 0.1, report  # it did drain: served through drain_delay
    assert sum(t < signalled_wall for t in b_times) >= 10, f"B took no real share of the load: {report}"
    after = [s for s in samples if s.sent >= gone]
    assert len(after) >= 10, f"too few requests after B exited to judge: {report}"
    assert "shutdown timeout reached" not in b_logs, b_logs[-3000:]
