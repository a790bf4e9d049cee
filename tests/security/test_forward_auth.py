"""Forward-auth: `/.gateway/authz` decides for a proxy in front (CONTRACT.md "Forward-auth").

Every test drives the real gateway (its proxy listener, in this process) with aiohttp, in
front of the real upstream and the real store (SQLite and PostgreSQL). The three ways to
name the request to decide are each checked for the allowed answer and for every refusal
kind: the X-Forwarded-Method/-Uri pair (Traefik, Caddy), the X-Original-Method/-URI pair
(nginx, whose refusals other than 401/403 become 403 + X-Gateway-Status), and the path after
/.gateway/authz with the request's own method (Envoy ext_authz). Then what must never be
decided (ambiguous requests, path tricks, identity headers), who may ask (peers), and that
/.gateway/ is never forwarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.config import load_config
from gateway.errors import ConfigError
from tests.conftest import DEFAULT_POLICIES, Harness, write_config
from tests.upstream import SEEN

MakeHarness = Callable[..., Awaitable[Harness]]

AUTHZ = "/.gateway/authz"
PEERS = "forward_auth:\n  peers: [127.0.0.1/32]\n"
APP = "http://app.example:3000"
OTHER = "http://other.example"
FIXED = "http://fixed.example:8000"
IDENTITY = ("X-Service-User", "X-Service-User-Roles", "X-Service-Token-Id")
NGINX = ("X-Original-Method", "X-Original-URI")
TRAEFIK = ("X-Forwarded-Method", "X-Forwarded-Uri")
CONVENTIONS = ["traefik", "nginx", "envoy"]

Pairs = Iterable[tuple[str, str]] | Mapping[str, str]


@dataclass(frozen=True)
class Caller:
    """A service user with one token."""

    user: str
    token_id: str
    secret: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


async def caller(
    harness: Harness, user: str, roles: Iterable[str] = ("reader",), origins: Iterable[str] = ()
) -> Caller:
    await harness.directory.create_user(user, actor="test", roles=list(roles), origins=list(origins))
    view, secret = await harness.directory.create_token(user, "t", actor="test")
    await harness.settle()
    return Caller(user, view.id, secret)


async def peer_harness(make_harness: MakeHarness, extra_yaml: str = "", **options: str) -> Harness:
    return await make_harness(extra_yaml=PEERS + extra_yaml, **options)


async def authz(
    harness: Harness, headers: Pairs = (), *, method: str = "GET", path: str = AUTHZ
) -> ClientResponse:
    """Send one decision request; `headers` may repeat a name (pairs are sent in order)."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    return await harness.send(method, path, headers=CIMultiDict(items))


@dataclass(frozen=True)
class Raw:
    """A response read off a raw connection."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def error(self) -> str:
        code = json.loads(self.body)["error"]
        assert isinstance(code, str)
        return code


async def raw_authz(harness: Harness, lines: Iterable[str], *, target: str = AUTHZ) -> Raw:
    """Send a GET decision request byte for byte (the aiohttp client folds same-name headers)."""
    port = harness.client.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "".join(f"{line}\r\n" for line in [f"GET {target} HTTP/1.1", "Host: gw.test", *lines])
        writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return Raw(int(status_line.split(" ", 2)[1]), headers, body)


async def ask(
    harness: Harness, convention: str, method: str, uri: str, headers: Mapping[str, str] | None = None
) -> ClientResponse:
    """Ask for a decision on `method uri` the way `convention`'s proxy asks."""
    extra = dict(headers or {})
    if convention == "traefik":
        return await authz(harness, {TRAEFIK[0]: method, TRAEFIK[1]: uri, **extra})
    if convention == "nginx":
        return await authz(harness, {NGINX[0]: method, NGINX[1]: uri, **extra})
    assert convention == "envoy"
    return await authz(harness, extra, method=method, path=AUTHZ + uri)


async def error_of(response: ClientResponse) -> str:
    body = await response.json()
    assert isinstance(body, dict)
    code = body["error"]
    assert isinstance(code, str)
    return code


async def assert_refused(
    response: ClientResponse, status: int, code: str, *, nginx: bool = False, what: str = ""
) -> None:
    """The proxy's refusal `status`/`code`; under the nginx pair, 403 + X-Gateway-Status unless 401/403."""
    label = f"{what}: {response.status} {dict(response.headers)}"
    if nginx and status not in (401, 403):
        assert response.status == 403, label
        assert response.headers.get("X-Gateway-Status") == str(status), label
    else:
        assert response.status == status, label
        assert "X-Gateway-Status" not in response.headers, label
    assert await error_of(response) == code, label
    assert response.headers["Cache-Control"] == "no-store", label
    assert response.headers["X-Request-Id"], label
    for name in IDENTITY:
        assert name not in response.headers, label
    assert "Access-Control-Allow-Origin" not in response.headers, label


async def assert_allowed(response: ClientResponse, caller: Caller | None, roles: str = "") -> None:
    """Exactly 200, empty body, the identity headers (none for a public rule), no-store."""
    label = f"{response.status} {dict(response.headers)}"
    assert response.status == 200, label
    assert await response.read() == b"", label
    assert response.headers["Cache-Control"] == "no-store", label
    assert response.headers["X-Request-Id"], label
    assert "X-Gateway-Status" not in response.headers, label
    assert "Access-Control-Allow-Origin" not in response.headers, label
    if caller is None:
        for name in IDENTITY:
            assert name not in response.headers, label
        return
    assert response.headers.getall("X-Service-User") == [caller.user], label
    assert response.headers.getall("X-Service-User-Roles") == [roles], label
    assert response.headers.getall("X-Service-Token-Id") == [caller.token_id], label


# --- Allowed: the answer a proxy copies upstream -------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
async def test_allowed_answer_carries_the_identity(make_harness: MakeHarness, convention: str) -> None:
    harness = await peer_harness(make_harness)
    reader = await caller(harness, "reader-svc", roles=["reader"])
    writer = await caller(harness, "writer-svc", roles=["writer", "other"])
    seen = harness.upstream_app[SEEN]

    await assert_allowed(await ask(harness, convention, "GET", "/echo/a", reader.bearer), reader, "reader")
    # The query takes no part in matching (nor in the path checks).
    query = "/echo/a?next=/../admin&x=%2F"
    await assert_allowed(await ask(harness, convention, "GET", query, reader.bearer), reader, "reader")
    # The decided method is the one named, not the decision request's own (Envoy: they are one).
    await assert_allowed(
        await ask(harness, convention, "DELETE", "/echo/x", writer.bearer), writer, "other,writer"
    )
    await assert_allowed(
        await ask(harness, convention, "POST", "/echo/deep/x", writer.bearer), writer, "other,writer"
    )
    # The same token is refused what its roles do not grant.
    await assert_refused(
        await ask(harness, convention, "DELETE", "/echo/x", reader.bearer),
        403,
        "forbidden",
        nginx=convention == "nginx",
    )
    assert seen == []  # decided, never forwarded


async def test_envoy_post_with_a_body_is_decided_by_its_own_method(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    writer = await caller(harness, "poster", roles=["writer"])
    response = await harness.send("POST", AUTHZ + "/echo/items?x=1", headers=writer.bearer, data=b"{}")
    await assert_allowed(response, writer, "writer")
    reader = await caller(harness, "getter", roles=["reader"])
    refused = await harness.send("POST", AUTHZ + "/echo/items", headers=reader.bearer, data=b"{}")
    await assert_refused(refused, 403, "forbidden")
    assert (await harness.send("PUT", AUTHZ + "/echo/items", headers=writer.bearer)).status == 200
    assert harness.upstream_app[SEEN] == []


async def test_custom_identity_header_names_are_used_in_the_answer(make_harness: MakeHarness) -> None:
    harness = await peer_harness(
        make_harness,
        "identity:\n  user_header: X-Auth-User\n  roles_header: X-Auth-Roles\n"
        "  token_id_header: X-Auth-Token-Id\n",
    )
    svc = await caller(harness, "custom", roles=["writer"])
    for convention in CONVENTIONS:
        response = await ask(harness, convention, "GET", "/echo/a", svc.bearer)
        assert response.status == 200, convention
        assert response.headers.getall("X-Auth-User") == ["custom"]
        assert response.headers.getall("X-Auth-Roles") == ["writer"]
        assert response.headers.getall("X-Auth-Token-Id") == [svc.token_id]
        for name in IDENTITY:
            assert name not in response.headers, (convention, name)
    # The configured names are identity headers too: never accepted in a decision request,
    # and neither are the default names.
    for name in ("X-Auth-User", "x_auth_roles", "X.AUTH.TOKEN.ID", "X-Service-User"):
        refused = await ask(harness, "traefik", "GET", "/echo/a", {**svc.bearer, name: "root"})
        await assert_refused(refused, 400, "bad_request", what=name)


async def test_public_rule_is_allowed_without_identity(make_harness: MakeHarness) -> None:
    policies = DEFAULT_POLICIES + (
        '  open:\n    rules:\n      - methods: [GET]\n        paths: ["/open/**"]\n        public: true\n'
    )
    upstream_route = '  - name: open\n    prefix: /open\n    upstream: "http://127.0.0.1:9"\n'
    harness = await make_harness(extra_yaml=upstream_route + PEERS, policies=policies)
    svc = await caller(harness, "public-svc", roles=["writer"])
    for convention in CONVENTIONS:
        await assert_allowed(await ask(harness, convention, "GET", "/open/page"), None)
        # A token on a public rule names nobody upstream either.
        await assert_allowed(await ask(harness, convention, "GET", "/open/page", svc.bearer), None)
        # The default policies' public POST rule; the other methods on that path need a token.
        await assert_allowed(await ask(harness, convention, "POST", "/echo/hook"), None)
        await assert_refused(
            await ask(harness, convention, "PUT", "/echo/hook"),
            401,
            "missing_token",
            nginx=convention == "nginx",
        )
        # A public rule still needs its route and a clean path.
        await assert_refused(
            await ask(harness, convention, "GET", "/open/a%2Fb"),
            400,
            "bad_request",
            nginx=convention == "nginx",
        )


# --- Refusals: each kind, under each convention --------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
async def test_every_refusal_kind(make_harness: MakeHarness, convention: str) -> None:
    harness = await peer_harness(make_harness)
    nginx = convention == "nginx"
    reader = await caller(harness, "reader", roles=["reader"])
    browser = await caller(harness, "browser", roles=["reader"], origins=[APP])
    expired = await caller(harness, "expired", roles=["reader"])
    disabled = await caller(harness, "disabled", roles=["reader"])
    await harness.directory.expire_token("expired", "t", actor="test")
    await harness.directory.update_user("disabled", actor="test", disabled=True)
    await harness.settle()

    missing = await ask(harness, convention, "GET", "/echo/a")
    await assert_refused(missing, 401, "missing_token", nginx=nginx)
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'

    invalid = await ask(harness, convention, "GET", "/echo/a", {"Authorization": "Bearer gw_not-a-token"})
    await assert_refused(invalid, 401, "invalid_token", nginx=nginx)
    assert invalid.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'

    gone = await ask(harness, convention, "GET", "/echo/a", expired.bearer)
    await assert_refused(gone, 401, "token_expired", nginx=nginx)
    assert "error=" in gone.headers["WWW-Authenticate"]

    off = await ask(harness, convention, "GET", "/echo/a", disabled.bearer)
    await assert_refused(off, 401, "user_disabled", nginx=nginx)

    await assert_refused(
        await ask(harness, convention, "DELETE", "/echo/a", reader.bearer), 403, "forbidden", nginx=nginx
    )
    # No rule at all on the route is a 403 too.
    await assert_refused(
        await ask(harness, convention, "GET", "/echo/deep/x", reader.bearer), 403, "forbidden", nginx=nginx
    )
    await assert_refused(
        await ask(harness, convention, "GET", "/nowhere", reader.bearer), 404, "no_route", nginx=nginx
    )
    await assert_refused(
        await ask(harness, convention, "GET", "/echo/a%2Fb", reader.bearer), 400, "bad_request", nginx=nginx
    )
    trace = await ask(harness, convention, "TRACE", "/echo/a", reader.bearer)
    await assert_refused(trace, 405, "method_not_allowed", nginx=nginx)
    assert "TRACE" not in trace.headers["Allow"] and "GET" in trace.headers["Allow"]

    wrong_origin = await ask(harness, convention, "GET", "/app/items", {**browser.bearer, "Origin": OTHER})
    await assert_refused(wrong_origin, 403, "origin_not_allowed", nginx=nginx)
    # The same user from its own origin passes, with no CORS headers in the answer.
    await assert_allowed(
        await ask(harness, convention, "GET", "/app/items", {**browser.bearer, "Origin": APP}),
        browser,
        "reader",
    )
    # An admin token never passes the proxy, so it never gets a 200 here either.
    await harness.directory.create_user("root-admin", actor="test", admin=True)
    _, admin_secret = await harness.directory.create_token("root-admin", "t", actor="test")
    await harness.settle()
    admin = await ask(harness, convention, "GET", "/echo/a", {"Authorization": f"Bearer {admin_secret}"})
    await assert_refused(admin, 403, "forbidden", nginx=nginx)
    assert harness.upstream_app[SEEN] == []


async def test_a_refusal_keeps_its_retry_after(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "busy", roles=["reader"])
    # Every store lookup slot and queue place taken: a token not yet cached is a 503 with Retry-After.
    authenticator = harness.gateway.authenticator
    authenticator.max_lookups = 0
    authenticator.max_queued_lookups = 0
    for convention in CONVENTIONS:
        response = await ask(harness, convention, "GET", "/echo/a", svc.bearer)
        await assert_refused(response, 503, "store_unavailable", nginx=convention == "nginx", what=convention)
        assert response.headers["Retry-After"] == "1", convention


async def test_no_cors_headers_on_any_answer(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    browser = await caller(harness, "spa", roles=["reader"], origins=[APP])
    for convention in CONVENTIONS:
        for origin in (APP, FIXED):
            headers = {"Origin": origin}
            allowed = await ask(harness, convention, "GET", "/app/items", {**browser.bearer, **headers})
            assert allowed.status == 200
            refused = await ask(harness, convention, "GET", "/app/items", headers)  # no token: 401
            assert refused.status == 401
            bad = await ask(harness, convention, "PUT", "/app/nope/%2e%2e/x", headers)
            assert bad.status == (403 if convention == "nginx" else 400)
            for response in (allowed, refused, bad):
                assert not [name for name in response.headers if name.lower().startswith("access-control-")]
                assert "Origin" not in response.headers.get("Vary", "")
        # A preflight cannot travel through the hook: decided as a plain OPTIONS, never answered as one.
        preflight = await ask(
            harness,
            convention,
            "OPTIONS",
            "/app/items",
            {"Origin": APP, "Access-Control-Request-Method": "PUT"},
        )
        assert preflight.status == 401
        assert "Access-Control-Allow-Origin" not in preflight.headers


# --- Ambiguous decision requests: 400 ------------------------------------------------------------


def nginx_sent(headers: Pairs) -> bool:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return any(name.lower() in ("x-original-method", "x-original-uri") for name, _ in items)


async def assert_bad_request(
    harness: Harness, headers: Pairs, *, method: str = "GET", path: str = AUTHZ
) -> None:
    """400 bad_request; when an X-Original-* header was sent, nginx's 403 + X-Gateway-Status: 400."""
    response = await authz(harness, headers, method=method, path=path)
    await assert_refused(response, 400, "bad_request", nginx=nginx_sent(headers), what=f"{path} {headers}")


async def test_ambiguous_sources_are_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "ambiguous", roles=["writer"])
    token = svc.bearer["Authorization"]
    good_traefik = {TRAEFIK[0]: "GET", TRAEFIK[1]: "/echo/a", "Authorization": token}
    good_nginx = {NGINX[0]: "GET", NGINX[1]: "/echo/a", "Authorization": token}
    assert (await authz(harness, good_traefik)).status == 200  # the controls
    assert (await authz(harness, good_nginx)).status == 200

    # Both pairs, even when they agree.
    await assert_bad_request(harness, {**good_traefik, **good_nginx})
    # Half a pair: each of the four halves alone, with or without a complete other pair.
    for name in (*NGINX, *TRAEFIK):
        value = "GET" if name.endswith("Method") else "/echo/a"
        await assert_bad_request(harness, {name: value, "Authorization": token})
        await assert_bad_request(harness, {name: value, "Authorization": token}, path=AUTHZ + "/echo/a")
    await assert_bad_request(harness, {**good_traefik, NGINX[1]: "/echo/a"})
    await assert_bad_request(harness, {**good_nginx, TRAEFIK[0]: "GET"})
    # A repeated header: each of the four names twice, same value or not.
    for pair in (NGINX, TRAEFIK):
        for name in pair:
            value = "GET" if name.endswith("Method") else "/echo/a"
            other = "DELETE" if name.endswith("Method") else "/echo/b"
            sent = [(pair[0], "GET"), (pair[1], "/echo/a"), ("Authorization", token)]
            await assert_bad_request(harness, [*sent, (name, value)])
            await assert_bad_request(harness, [*sent, (name, other)])
            # Spelled differently (the aiohttp client would fold these into one: sent raw).
            raw = await raw_authz(harness, [f"{k}: {v}" for k, v in sent] + [f"{name.upper()}: {value}"])
            assert (raw.status, raw.error) == (
                (403, "bad_request") if pair == NGINX else (400, "bad_request")
            )
            assert raw.headers.get("X-Gateway-Status") == ("400" if pair == NGINX else None)
            assert "X-Service-User" not in raw.headers
    # Two credentials: which one would the upstream see?
    await assert_bad_request(harness, [*good_traefik.items(), ("Authorization", token)])
    await assert_bad_request(
        harness, [("Authorization", token), ("Authorization", token)], path=AUTHZ + "/echo/a"
    )
    # A pair and a path after /.gateway/authz (even an empty one).
    for path in (AUTHZ + "/echo/a", AUTHZ + "/"):
        await assert_bad_request(harness, good_traefik, path=path)
        await assert_bad_request(harness, good_nginx, path=path)
    # Nothing to decide.
    await assert_bad_request(harness, {"Authorization": token})
    await assert_bad_request(harness, {"Authorization": token}, method="POST")
    assert harness.upstream_app[SEEN] == []


async def test_malformed_method_or_uri_is_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "malformed", roles=["writer"])
    for pair in (TRAEFIK, NGINX):
        for method in ("GE T", "GET,POST", "", "G\tT", "GET/1", "GÉT"):
            await assert_bad_request(harness, {pair[0]: method, pair[1]: "/echo/a", **svc.bearer})
        for uri in (
            "http://x/echo",
            "echo/a",
            "*",
            "",
            "/echo/a b",
            "/echo/a\tb",
            "/echo/a?x=1 2",
            "/echo/caf\u00e9",
        ):
            await assert_bad_request(harness, {pair[0]: "GET", pair[1]: uri, **svc.bearer})


async def test_a_method_the_proxy_would_refuse_is_not_allowed(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "cased", roles=["other"])  # `deep` has one rule, for every method
    for convention in ("traefik", "nginx"):
        assert (await ask(harness, convention, "DELETE", "/echo/deep/x", svc.bearer)).status == 200
        for method in ("delete", "trace", "Get", "BREW"):
            response = await ask(harness, convention, method, "/echo/deep/x", svc.bearer)
            nginx = convention == "nginx"
            await assert_refused(response, 400, "bad_request", nginx=nginx, what=f"{convention} {method}")


async def test_control_characters_in_the_uri_are_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "control", roles=["writer"])
    token = svc.bearer["Authorization"]
    control = await raw_authz(
        harness, [f"{TRAEFIK[0]}: GET", f"{TRAEFIK[1]}: /echo/ab", f"Authorization: {token}"]
    )
    assert control.status == 200 and control.headers["X-Service-User"] == "control"
    for char in ("\x01", "\x1f", "\x7f", "\t", "\x85", "\xa0"):
        for pair in (TRAEFIK, NGINX):
            lines = [f"{pair[0]}: GET", f"{pair[1]}: /echo/a{char}b", f"Authorization: {token}"]
            raw = await raw_authz(harness, lines)
            assert raw.error == "bad_request", (repr(char), pair, raw)
            assert "X-Service-User" not in raw.headers
            if char in "\t\x85\xa0":  # valid in a field value: the endpoint refuses it
                assert raw.status == (403 if pair == NGINX else 400), (repr(char), pair, raw)
                assert raw.headers.get("X-Gateway-Status") == ("400" if pair == NGINX else None)
            else:  # the HTTP parser may refuse it first (400), else the endpoint does
                assert raw.status in (400, 403), (repr(char), pair, raw)


async def test_identity_headers_in_the_decision_request_are_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "spoof", roles=["writer"])
    for name in ("X-Service-User", "x_service_user", "X.Service.User-Roles", "X-SERVICE-TOKEN-ID"):
        for convention in CONVENTIONS:
            nginx, what = convention == "nginx", f"{convention} {name}"
            response = await ask(harness, convention, "GET", "/echo/a", {**svc.bearer, name: "root"})
            await assert_refused(response, 400, "bad_request", nginx=nginx, what=what)
            # Even on a public rule, and even empty.
            public = await ask(harness, convention, "POST", "/echo/hook", {name: ""})
            await assert_refused(public, 400, "bad_request", nginx=nginx, what=what)


async def test_an_assertion_header_in_the_decision_request_is_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "asserting", roles=["writer"])
    response = await ask(
        harness, "traefik", "GET", "/echo/a", {**svc.bearer, "X-Service-User-Assertion": "x"}
    )
    await assert_refused(response, 400, "bad_request")


async def test_bearer_subprotocol_is_refused(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "socket", roles=["writer"])
    for convention in CONVENTIONS:
        nginx = convention == "nginx"
        for value in ("chat, bearer.gw_xxx", "Bearer.gw_xxx", "chat,BEARER." + svc.secret):
            response = await ask(
                harness, convention, "GET", "/echo/a", {**svc.bearer, "Sec-WebSocket-Protocol": value}
            )
            await assert_refused(response, 400, "bad_request", nginx=nginx, what=value)
        plain = await ask(
            harness, convention, "GET", "/echo/a", {**svc.bearer, "Sec-WebSocket-Protocol": "chat"}
        )
        await assert_allowed(plain, svc, "writer")


# --- Path tricks in the request to decide: never a 200 -------------------------------------------


TRICKS = [
    "/echo/../x",
    "/echo/%2e%2e/x",
    "/echo/%2E./x",
    "/echo/a%2Fb",
    "/echo/a;b",
    "/echo//a",
    "/echo/a%00",
]


@pytest.mark.parametrize("convention", CONVENTIONS)
async def test_path_tricks_are_refused(make_harness: MakeHarness, convention: str) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "tricky", roles=["service-user-project-admin"])
    nginx = convention == "nginx"
    for uri in [*TRICKS, "/echo/a%5Cb", "/echo/a\\b", "/echo/./a", "/echo/a/..", "/echo/a%zz"]:
        response = await ask(harness, convention, "GET", uri, svc.bearer)
        await assert_refused(response, 400, "bad_request", nginx=nginx, what=uri)
    # Outside every route: 404 (route before path).
    for uri in ["/%2e%2e/echo/a", "//echo/a", "/x/../echo/a"]:
        response = await ask(harness, convention, "GET", uri, svc.bearer)
        await assert_refused(response, 404, "no_route", nginx=nginx, what=uri)
    if convention == "envoy":
        response = await harness.send("GET", AUTHZ + "/echo/%2e%2e/secret", headers=svc.bearer)
        await assert_refused(response, 400, "bad_request")
    assert harness.upstream_app[SEEN] == []


# --- Who may ask, and what lies under /.gateway/ -------------------------------------------------


async def test_without_forward_auth_the_endpoint_is_a_404(make_harness: MakeHarness) -> None:
    harness = await make_harness()
    svc = await caller(harness, "nobody-asks", roles=["writer"])
    for response in (
        await ask(harness, "traefik", "GET", "/echo/a", svc.bearer),
        # No nginx translation either: only a listed peer is answered the way nginx needs.
        await ask(harness, "nginx", "GET", "/echo/a", svc.bearer),
        await ask(harness, "envoy", "GET", "/echo/a", svc.bearer),
        await harness.send("GET", AUTHZ, headers=svc.bearer),
    ):
        await assert_refused(response, 404, "no_route")
    assert harness.upstream_app[SEEN] == []


async def test_a_requester_outside_the_peers_gets_a_404(make_harness: MakeHarness) -> None:
    harness = await make_harness(extra_yaml="forward_auth:\n  peers: [10.0.0.0/8, '::1/128']\n")
    svc = await caller(harness, "not-a-peer", roles=["writer"])
    for response in (
        await ask(harness, "traefik", "GET", "/echo/a", svc.bearer),
        await ask(harness, "nginx", "GET", "/echo/a", svc.bearer),
        await ask(harness, "envoy", "GET", "/echo/a", svc.bearer),
        # Spoofing the client address does not make a peer.
        await ask(harness, "traefik", "GET", "/echo/a", {**svc.bearer, "X-Forwarded-For": "10.1.2.3"}),
    ):
        await assert_refused(response, 404, "no_route")
    assert harness.upstream_app[SEEN] == []


async def test_unknown_gateway_endpoints_are_a_404_for_a_peer(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "peer", roles=["writer"])
    traefik = {TRAEFIK[0]: "GET", TRAEFIK[1]: "/echo/a", **svc.bearer}
    nginx = {NGINX[0]: "GET", NGINX[1]: "/echo/a", **svc.bearer}
    for path in (
        "/.gateway/nope",
        "/.gateway",
        "/.gateway/",
        "/.gateway//authz",
        "/.gateway/authzz",
        "/.gateway/./authz",
        "/.gateway/tokens",  # /.gateway/token and /.gateway/jwks.json are endpoints (API keys)
    ):
        for pair in (traefik, nginx):  # not the endpoint: a plain 404, even with the nginx pair
            await assert_refused(await authz(harness, pair, path=path), 404, "no_route", what=path)
    assert harness.upstream_app[SEEN] == []


async def test_the_endpoint_is_recognised_on_the_canonical_path(make_harness: MakeHarness) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "canonical", roles=["writer"])
    pair = {TRAEFIK[0]: "GET", TRAEFIK[1]: "/echo/a", **svc.bearer}
    for path in ("/%2Egateway/authz", "/%2egateway/authz", "/.gateway/%61uthz"):
        await assert_allowed(await authz(harness, pair, path=path), svc, "writer")
    await assert_allowed(
        await harness.send("GET", "/%2Egateway/authz/echo/a", headers=svc.bearer), svc, "writer"
    )
    assert harness.upstream_app[SEEN] == []


ROOT_POLICIES = DEFAULT_POLICIES + '  root:\n    rules:\n      - paths: ["/**"]\n        public: true\n'


def root_route(upstream: TestServer) -> str:
    return f'  - name: root\n    prefix: /\n    upstream: "{str(upstream.make_url("")).rstrip("/")}"\n'


@pytest.mark.parametrize("peers", ["forward_auth:\n  peers: []\n", PEERS], ids=["no-peers", "peer"])
async def test_gateway_paths_are_never_forwarded_even_under_a_root_route(
    make_harness: MakeHarness, upstream: TestServer, peers: str
) -> None:
    harness = await make_harness(extra_yaml=root_route(upstream) + peers, policies=ROOT_POLICIES)
    seen = harness.upstream_app[SEEN]
    assert (await harness.send("GET", "/anything/else")).status == 200  # the root route forwards
    assert len(seen) == 1
    for path in (
        "/.gateway/nope",
        "/.gateway",
        "/.gateway/",
        "/%2Egateway/nope",
        "/%2egateway/token",
        AUTHZ,
    ):
        for method in ("GET", "POST", "OPTIONS"):
            response = await harness.send(method, path, headers={"Origin": FIXED})
            assert response.status in (400, 404), (method, path, response.status)
            if response.status == 404:
                assert await error_of(response) == "no_route"
            else:  # a peer's decision request with nothing to decide
                assert peers == PEERS and path == AUTHZ and await error_of(response) == "bad_request"
            assert "Access-Control-Allow-Origin" not in response.headers
    assert len(seen) == 1, [r.raw_path for r in seen[1:]]
    if peers == PEERS:
        # Under the root route a public rule covers everything: an Envoy-form decision says so.
        await assert_allowed(await harness.send("GET", AUTHZ + "/anything"), None)
        await assert_allowed(await ask(harness, "traefik", "GET", "/anything"), None)
        # But not the gateway's own paths: /.gateway/* is decided first, before any route.
        for uri in ("/.gateway/token", "/%2Egateway/jwks.json", AUTHZ):
            for convention in CONVENTIONS:
                response = await ask(harness, convention, "GET", uri)
                await assert_refused(response, 404, "no_route", nginx=convention == "nginx", what=uri)
        assert len(seen) == 1


@pytest.mark.parametrize("prefix", ["/.gateway", "/.gateway/x", "/.gateway/authz"])
def test_a_route_under_the_gateway_paths_is_a_config_error(tmp_path: Path, prefix: str) -> None:
    route = f'  - name: mine\n    prefix: {prefix}\n    upstream: "http://127.0.0.1:9"\n'
    path = write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        upstream_url="http://127.0.0.1:9",
        extra_yaml=route + "log_level: info\n",  # a key at column 0: write_config dedents extra_yaml
    )
    line = path.read_text().splitlines().index(f"    prefix: {prefix}") + 1
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [problem] = info.value.problems
    assert re.fullmatch(rf"{re.escape(str(path))}:{line}: .*\.gateway.*", problem), problem


# --- Every decision is one access-log line -------------------------------------------------------


async def test_each_decision_writes_one_access_line(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await peer_harness(make_harness)
    svc = await caller(harness, "logged", roles=["reader"])
    cases = [
        ("allowed", {TRAEFIK[0]: "GET", TRAEFIK[1]: "/echo/a?secret=1", **svc.bearer}, 200, None, "GET"),
        ("forbidden", {NGINX[0]: "DELETE", NGINX[1]: "/echo/a", **svc.bearer}, 403, "forbidden", "DELETE"),
        ("no-route", {NGINX[0]: "GET", NGINX[1]: "/nowhere", **svc.bearer}, 403, "no_route", "GET"),
        ("ambiguous", {TRAEFIK[0]: "GET", **svc.bearer}, 400, "bad_request", None),
    ]
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for request_id, headers, _, _, _ in cases:
            await authz(harness, {**headers, "X-Request-Id": request_id})
    lines = [r.msg for r in caplog.records if r.name == "gateway.access" and isinstance(r.msg, dict)]
    for request_id, _, status, code, method in cases:
        [line] = [item for item in lines if item.get("request_id") == request_id]
        assert line["status"] == status, line
        assert line["error"] == code, line
        if method is not None:
            assert line["method"] == method, line
            assert line["path"] in ("/echo/a", "/nowhere"), line
        if code in (None, "forbidden"):
            assert line["user"] == "logged" and line["token_id"] == svc.token_id, line
            assert line["route"] == "echo", line
    assert svc.secret not in caplog.text
    assert "secret=1" not in caplog.text
