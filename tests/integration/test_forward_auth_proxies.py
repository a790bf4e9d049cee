"""Forward-auth through real proxies: nginx `auth_request` and Caddy `forward_auth` (README "Forward-auth").

Real nginx (Debian nginx-light) and real Caddy (Debian caddy) run as child processes on
loopback, in front of the real echo upstream (tests/upstream.py, which records every request
it receives), and ask the real gateway (in this process, `forward_auth.peers: [127.0.0.1/32]`)
for each decision at `/.gateway/authz`. Their configs are the README's snippets.

In this mode the proxy in front decides what bytes reach the upstream; so every test that
expects a refusal also proves the upstream saw nothing. Under CI a missing proxy binary
fails the test (a skipped real-part test hides a broken feature); elsewhere it skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.conftest import IN_CI, Harness
from tests.process import free_port, stop_process, until_listening
from tests.upstream import SEEN, header_values

# Decisions do not depend on the store: one store keeps the file well under its time budget.
pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)

NGINX = "/usr/sbin/nginx"
CADDY = "/usr/bin/caddy"
FORWARD_AUTH = "forward_auth:\n  peers: [127.0.0.1/32]\n"
IDENTITY = ("X-Service-User", "X-Service-User-Roles", "X-Service-Token-Id")
READY_SECONDS = 10.0
STOP_SECONDS = 5.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


def proxy_unavailable(binary: str) -> None:
    """Fail under CI (.ci/run installs nginx-light and caddy), skip elsewhere."""
    message = f"{binary} is needed (Debian package {'nginx-light' if 'nginx' in binary else 'caddy'})"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def nginx_conf(directory: Path, port: int, gateway: str, upstream: str) -> str:
    """The README's nginx snippet inside a minimal nginx.conf that keeps every file in `directory`."""
    # Run as whoever runs the tests: as root, nginx would otherwise switch its workers to www-data.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""\
{user}daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 128; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;

    server {{
        listen 127.0.0.1:{port};

        # --- README snippet (nginx) ---
        location / {{
            auth_request /.gw-authz;
            auth_request_set $gw_user $upstream_http_x_service_user;
            auth_request_set $gw_roles $upstream_http_x_service_user_roles;
            auth_request_set $gw_token $upstream_http_x_service_token_id;
            proxy_set_header X-Service-User $gw_user;
            proxy_set_header X-Service-User-Roles $gw_roles;
            proxy_set_header X-Service-Token-Id $gw_token;
            proxy_set_header Authorization "";
            proxy_pass http://{upstream};
        }}
        location = /.gw-authz {{
            internal;
            proxy_pass http://{gateway}/.gateway/authz;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
        # --- end of snippet ---
    }}
}}
"""


def caddyfile(port: int, gateway: str, upstream: str) -> str:
    """The README's Caddy snippet (a site block) with the global options a test instance needs."""
    return f"""\
{{
	admin off
	auto_https off
}}

# --- README snippet (Caddy) ---
http://127.0.0.1:{port} {{
	bind 127.0.0.1
	route {{
		request_header -X-Service-User
		request_header -X-Service-User-Roles
		request_header -X-Service-Token-Id
		forward_auth {gateway} {{
			uri /.gateway/authz
			copy_headers X-Service-User X-Service-User-Roles X-Service-Token-Id
		}}
		# Caddy before 2.9 copies a header the 200 lacks as the placeholder's own text: drop it.
		@no_user header_regexp X-Service-User ^\\{{http\\.reverse_proxy\\.
		request_header @no_user -X-Service-User
		@no_roles header_regexp X-Service-User-Roles ^\\{{http\\.reverse_proxy\\.
		request_header @no_roles -X-Service-User-Roles
		@no_token_id header_regexp X-Service-Token-Id ^\\{{http\\.reverse_proxy\\.
		request_header @no_token_id -X-Service-Token-Id
		request_header -Authorization
		reverse_proxy {upstream}
	}}
}}
# --- end of snippet ---
"""


class ProxyProcess:
    """A proxy child process (not a daemon) with its output in a log file; stop() ends it."""

    def __init__(self, argv: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        """Poll the port until it accepts a connection (bounded; fails on an early exit)."""
        await until_listening(self.port, self.process, self.logs, READY_SECONDS)

    def stop(self) -> None:
        stop_process(self.process, STOP_SECONDS)
        self._log.close()


def start_nginx(directory: Path, gateway: str, upstream: str) -> ProxyProcess:
    if not os.access(NGINX, os.X_OK):
        proxy_unavailable(NGINX)
    directory.mkdir()
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, port, gateway, upstream))
    argv = [NGINX, "-p", f"{directory}/", "-e", "stderr", "-c", str(conf)]
    return ProxyProcess(argv, directory / "nginx.log", port)


def start_caddy(directory: Path, gateway: str, upstream: str) -> ProxyProcess:
    if not os.access(CADDY, os.X_OK):
        proxy_unavailable(CADDY)
    directory.mkdir()
    port = free_port()
    conf = directory / "Caddyfile"
    conf.write_text(caddyfile(port, gateway, upstream))
    # Caddy keeps state under $HOME / $XDG_*: keep it in the test's directory.
    env = {
        **os.environ,
        "HOME": str(directory),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "XDG_DATA_HOME": str(directory / "data"),
    }
    argv = [CADDY, "run", "--config", str(conf), "--adapter", "caddyfile"]
    return ProxyProcess(argv, directory / "caddy.log", port, env)


STARTERS: dict[str, Callable[[Path, str, str], ProxyProcess]] = {"nginx": start_nginx, "caddy": start_caddy}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Front:
    """A real proxy in front of the upstream, asking the gateway `harness` for decisions."""

    kind: str
    proxy: ProxyProcess
    harness: Harness

    @property
    def seen(self) -> list[web.Request]:
        """Every request the upstream received (through the proxy; the gateway forwards nothing here)."""
        return self.harness.upstream_app[SEEN]

    async def send(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send `path` byte for byte (dot segments and escapes intact) to the proxy."""
        url = URL(f"http://127.0.0.1:{self.proxy.port}{path}", encoded=True)
        session = self.harness.client.session
        async with session.request(method, url, timeout=REQUEST_TIMEOUT, **kwargs) as response:
            return Reply(response.status, dict(response.headers), await response.read())

    async def echo(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """Send through the proxy; the request must reach the upstream: what it received."""
        before = len(self.seen)
        reply = await self.send(method, path, **kwargs)
        assert reply.status == 200, (reply.status, reply.body, self.proxy.logs())
        assert len(self.seen) == before + 1
        echo = json.loads(reply.body)  # the upstream's JSON echo
        assert isinstance(echo, dict)
        return echo

    async def refused(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send through the proxy; the upstream must not be reached: the proxy's answer."""
        before = len(self.seen)
        reply = await self.send(method, path, **kwargs)
        assert reply.status != 200, (reply.status, reply.body)
        assert len(self.seen) == before, f"the upstream was reached: {self.seen[before:]}"
        return reply


@pytest.fixture(params=sorted(STARTERS))
async def front(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_harness: Callable[..., Awaitable[Harness]],
    upstream: TestServer,
) -> AsyncIterator[Front]:
    """nginx or Caddy, started on a free loopback port before the gateway and the upstream."""
    harness = await make_harness(extra_yaml=FORWARD_AUTH)
    gateway = f"127.0.0.1:{harness.client.port}"
    proxy = STARTERS[request.param](tmp_path / request.param, gateway, f"127.0.0.1:{upstream.port}")
    try:
        await proxy.wait_ready()
        yield Front(request.param, proxy, harness)
    finally:
        proxy.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def identity_seen(echo: dict[str, Any]) -> dict[str, list[str]]:
    """Every identity header the upstream received, in any spelling ('_' or '.' for '-'), by name."""
    folded = {name.lower(): name for name in IDENTITY}
    out: dict[str, list[str]] = {}
    for name, value in echo["headers"]:
        key = folded.get(name.lower().replace("_", "-").replace(".", "-"))
        if key is not None:
            out.setdefault(key, []).append(value)
    return out


async def gateway_identity(harness: Harness, token: str, path: str = "/echo/a") -> dict[str, list[str]]:
    """The identity headers the gateway itself sends upstream for `token` (the proxy's must match)."""
    response = await harness.client.get(path, headers=bearer(token))
    assert response.status == 200, await response.text()
    return identity_seen(await response.json())


# --- allowed ---------------------------------------------------------------------------------


async def test_allowed_request_reaches_the_upstream_with_the_gateways_identity(front: Front) -> None:
    h = front.harness
    token = await h.token()  # user svc, role writer
    (record,) = await h.directory.list_tokens("svc")
    echo = await front.echo("GET", "/echo/a/b?x=1&y=%2F", headers=bearer(token))
    assert echo["method"] == "GET"
    assert echo["raw_path"] == "/echo/a/b"
    assert echo["query"] == "x=1&y=%2F"
    seen = identity_seen(echo)
    assert seen["X-Service-User"] == ["svc"]
    assert seen["X-Service-Token-Id"] == [str(record.id)]
    assert seen == await gateway_identity(h, token)
    # As the gateway itself, the proxy never hands the credential to the upstream.
    assert header_values(echo, "Authorization") == []

    # The method reaches the decision: a writer may POST, with its body passed on untouched
    # (the decision request carries none: nginx sends it without, Caddy sends a bodiless GET).
    body = bytes(range(256)) * 3072  # 768 KiB (nginx takes 1 MiB by default)
    posted = await front.echo("POST", "/echo/w", headers=bearer(token), data=body)
    assert posted["method"] == "POST"
    assert (posted["body_bytes"], posted["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert identity_seen(posted)["X-Service-User"] == ["svc"]


async def test_public_rule_reaches_the_upstream_without_an_identity(front: Front) -> None:
    echo = await front.echo("POST", "/echo/hook", data=b"ping")
    assert echo["body_bytes"] == 4
    # Overwritten with nothing: no identity header at all reaches the upstream.
    assert identity_seen(echo) == {}, echo["headers"]
    # A client's identity headers are gone too (the '-' spelling; nginx drops '_' names, and the
    # gateway refuses a decision request carrying any other spelling, as the next tests show).
    headers = dict.fromkeys(IDENTITY, "admin")
    if front.kind == "nginx":  # nginx passes them to the auth subrequest: the gateway refuses (400 as 403)
        assert (await front.refused("POST", "/echo/hook", data=b"ping", headers=headers)).status == 403
    else:
        spoofed = await front.echo("POST", "/echo/hook", data=b"ping", headers=headers)
        assert identity_seen(spoofed) == {}, spoofed["headers"]


# --- refused ---------------------------------------------------------------------------------


async def test_missing_and_invalid_tokens_are_401_and_never_reach_the_upstream(front: Front) -> None:
    await front.harness.token()
    missing = await front.refused("GET", "/echo/a")
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    for credential in ("Bearer sug_not-a-real-token", "Basic c3ZjOnB3", "Bearer "):
        invalid = await front.refused("GET", "/echo/a", headers={"Authorization": credential})
        assert invalid.status == 401, credential
        assert "WWW-Authenticate" in invalid.headers


async def test_a_permission_not_granted_is_403(front: Front) -> None:
    h = front.harness
    reader = await h.token("ro", roles=["reader"])
    writer = await h.token("svc")
    allowed = await front.echo("GET", "/echo/a", headers=bearer(reader))
    assert identity_seen(allowed)["X-Service-User"] == ["ro"]
    for method in ("POST", "DELETE"):  # echo:write is not the reader's
        assert (await front.refused(method, "/echo/a", headers=bearer(reader))).status == 403
    # /echo/deep needs other:read, which writer does not carry.
    forbidden = await front.refused("GET", "/echo/deep/x", headers=bearer(writer))
    assert forbidden.status == 403
    if front.kind == "caddy":  # Caddy passes the gateway's answer on as it is
        assert json.loads(forbidden.body)["error"] == "forbidden"


async def test_a_path_without_a_route_is_refused(front: Front) -> None:
    token = await front.harness.token()
    reply = await front.refused("GET", "/nowhere/x", headers=bearer(token))
    if front.kind == "nginx":
        # nginx turns anything but 401/403 into 500: the gateway answers 403 (X-Gateway-Status:
        # 404), and nginx passes neither the body nor the headers of a 403 on.
        assert reply.status == 403
    else:
        assert reply.status == 404
        assert json.loads(reply.body)["error"] == "no_route"


# --- a client cannot choose the identity or the request that is decided ------------------------

SPELLINGS: dict[str, Callable[[str], str]] = {
    "canonical": lambda name: name,
    "lower": str.lower,
    "upper": str.upper,
    "underscore": lambda name: name.replace("-", "_"),
    "lower-underscore": lambda name: name.lower().replace("-", "_"),
    "dot": lambda name: name.replace("-", "."),
}
DASHED = {"canonical", "lower", "upper"}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
async def test_a_client_identity_header_never_reaches_the_upstream(front: Front, spelling: str) -> None:
    h = front.harness
    token = await h.token()
    forged = dict(zip(IDENTITY, ("admin", "service-user-project-admin", "forged"), strict=True))
    spoof = {SPELLINGS[spelling](name): value for name, value in forged.items()}
    spoof.update(bearer(token))
    before = len(front.seen)
    reply = await front.send("GET", "/echo/a", headers=spoof)
    if reply.status == 200:
        # Passed only with the client's values gone and the gateway's in their place.
        (request,) = front.seen[before:]
        echo = json.loads(reply.body)
        assert identity_seen(echo) == await gateway_identity(h, token)
        for value in forged.values():
            assert value not in request.headers.values(), request.headers
    else:
        # Or refused: the gateway answers 400 to a decision request carrying any spelling.
        assert reply.status in (400, 403), reply
        assert len(front.seen) == before
    # What each proxy does, so a change in either is noticed:
    if front.kind == "caddy":
        # request_header removes the '-' spelling before forward_auth; others reach the gateway: 400.
        assert reply.status == (200 if spelling in DASHED else 400)
    else:
        # nginx passes the client's headers to the auth subrequest (400, sent as 403) but drops
        # names with '_' or '.' (ignore_invalid_headers) before anything sees them.
        assert reply.status == (403 if spelling in DASHED else 200)


@pytest.mark.parametrize(
    "claimed",
    [
        {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/echo/allowed"},
        {"X-Forwarded-Uri": "/echo/allowed"},
        {"X-Original-Method": "GET", "X-Original-URI": "/echo/allowed"},
        {"X-Original-URI": "/echo/allowed"},
    ],
    ids=["x-forwarded-pair", "x-forwarded-uri", "x-original-pair", "x-original-uri"],
)
async def test_a_client_cannot_choose_the_request_that_is_decided(
    front: Front, claimed: dict[str, str]
) -> None:
    h = front.harness
    writer = await h.token()
    reader = await h.token("ro", roles=["reader"])
    assert (await front.echo("GET", "/echo/allowed", headers=bearer(writer)))["raw_path"] == "/echo/allowed"
    # The proxy sets its own pair (nginx X-Original-*, Caddy X-Forwarded-*) over the client's; a
    # client's header of the other pair reaches the gateway beside the proxy's: ambiguous, 400.
    own = "X-Original-" if front.kind == "nginx" else "X-Forwarded-"
    overwritten = all(name.startswith(own) for name in claimed)
    # A forbidden path (deep needs other:read), a method the reader lacks, a path with no route:
    for method, path, token, decided in (
        ("GET", "/echo/deep/secret", writer, 403),
        ("DELETE", "/echo/allowed", reader, 403),
        ("GET", "/nowhere", writer, 403 if front.kind == "nginx" else 404),
    ):
        reply = await front.refused(method, path, headers={**claimed, **bearer(token)})
        if overwritten:  # decided on the real request
            assert reply.status == decided, (method, path, reply)
        elif front.kind == "nginx":  # 400 sent as 403
            assert reply.status == 403, (method, path, reply)
        else:  # Caddy passes the gateway's refusal on
            assert reply.status in (400, 403), (method, path, reply)
            assert json.loads(reply.body)["error"] == "bad_request"
    # The same claim on a request allowed on its real path: decided on that path, or refused.
    headers = {**claimed, **bearer(writer)}
    if overwritten:
        assert (await front.echo("GET", "/echo/other", headers=headers))["raw_path"] == "/echo/other"
    else:
        await front.refused("GET", "/echo/other", headers=headers)


TRICKS = [
    "/echo/../admin",
    "/echo/%2e%2e/x",
    "/echo/a%2Fb",
    "/echo/a;b=c",
    "/echo/%2E%2e/echo/a",
    "/echo/./a",
]


@pytest.mark.parametrize("path", TRICKS)
async def test_path_tricks_in_the_original_uri_are_refused(front: Front, path: str) -> None:
    token = await front.harness.token()
    reply = await front.refused("GET", path, headers=bearer(token))
    if front.kind == "nginx":
        # 403 is the gateway's refusal (400 sent as 403); 400 is nginx refusing it itself.
        assert reply.status in (400, 403), reply
    else:
        assert reply.status == 400, reply
        assert json.loads(reply.body)["error"] == "bad_request"


async def test_the_proxy_fails_closed_when_the_gateway_is_down(front: Front) -> None:
    token = await front.harness.token()
    await front.echo("GET", "/echo/a", headers=bearer(token))
    await front.harness.client.server.close()  # the gateway's proxy listener goes away
    reply = await front.refused("GET", "/echo/a", headers=bearer(token))
    # nginx: an auth subrequest that fails is a 500; Caddy: the auth upstream is a 502.
    assert reply.status == (500 if front.kind == "nginx" else 502), reply


# --- the endpoint itself ---------------------------------------------------------------------


async def direct(harness: Harness, headers: dict[str, str], path: str = "/.gateway/authz") -> Reply:
    async with harness.client.session.get(
        harness.url(path), headers=headers, timeout=REQUEST_TIMEOUT
    ) as response:
        return Reply(response.status, dict(response.headers), await response.read())


NOT_LISTED = {"no-forward-auth": "", "other-peers": "forward_auth:\n  peers: [10.0.0.0/8, '::1/128']\n"}


async def assert_absent(harness: Harness, headers: dict[str, str], path: str = "/.gateway/authz") -> None:
    """The gateway answers as for any path without a route: 404 no_route, JSON, no identity."""
    reply = await direct(harness, headers, path)
    assert reply.status == 404, reply
    assert reply.headers["Content-Type"].startswith("application/json")
    assert json.loads(reply.body)["error"] == "no_route"
    assert "X-Gateway-Status" not in reply.headers
    assert not set(IDENTITY) & set(reply.headers)
    assert harness.upstream_app[SEEN] == []


@pytest.mark.parametrize("extra_yaml", NOT_LISTED.values(), ids=NOT_LISTED.keys())
async def test_the_endpoint_is_absent_for_a_peer_not_listed(
    make_harness: Callable[..., Awaitable[Harness]], extra_yaml: str
) -> None:
    h = await make_harness(extra_yaml=extra_yaml)
    token = await h.token()
    await assert_absent(h, {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/echo/a", **bearer(token)})
    await assert_absent(h, bearer(token))
    await assert_absent(h, bearer(token), "/.gateway/authz/echo/a")  # Envoy's form
    await assert_absent(h, bearer(token), "/%2Egateway/authz")


@pytest.mark.parametrize("extra_yaml", NOT_LISTED.values(), ids=NOT_LISTED.keys())
async def test_the_endpoint_is_absent_for_a_peer_not_listed_sending_x_original(
    make_harness: Callable[..., Awaitable[Harness]], extra_yaml: str
) -> None:
    h = await make_harness(extra_yaml=extra_yaml)
    token = await h.token()
    await assert_absent(h, {"X-Original-Method": "GET", "X-Original-URI": "/echo/a", **bearer(token)})


async def test_the_endpoint_for_a_listed_peer(make_harness: Callable[..., Awaitable[Harness]]) -> None:
    """What the proxies above rely on, asked directly: 200 with identity, 403 + X-Gateway-Status."""
    h = await make_harness(extra_yaml=FORWARD_AUTH)
    token = await h.token()
    nginx = {"X-Original-Method": "GET", "X-Original-URI": "/echo/a?q=1"}
    allowed = await direct(h, {**nginx, **bearer(token)})
    assert allowed.status == 200
    assert allowed.headers["X-Service-User"] == "svc"
    assert allowed.headers["Cache-Control"] == "no-store"
    no_route = await direct(h, {"X-Original-Method": "GET", "X-Original-URI": "/nowhere", **bearer(token)})
    assert (no_route.status, no_route.headers.get("X-Gateway-Status")) == (403, "404")
    assert "X-Service-User" not in no_route.headers
    caddy = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/nowhere"}
    assert (await direct(h, {**caddy, **bearer(token)})).status == 404
    both = await direct(h, {**nginx, **caddy, **bearer(token)})
    assert (both.status, both.headers.get("X-Gateway-Status")) == (403, "400")
    assert h.upstream_app[SEEN] == []
