"""Explain never disagrees with the proxy: the same request, decided both ways, over a generated table.

Each case (method × path × credential × Origin) is sent through the real proxy listener of an
in-process gateway, to the real echo upstream and the real store (SQLite and PostgreSQL), and
then explained with `gateway.explain.explain_request` for the same method, raw path, bearer
secret and Origin. The proxy's outcome is observed from outside:

- forwarded: the upstream (tests/upstream.py) recorded the request in `SEEN`; its raw target and
  identity headers are what explain must predict (`decision.upstream`, `identity_headers`);
- refused: the response status, and the JSON error code (from the body, and from the access-log
  line, which also covers HEAD, whose answers carry no body).

Cases come from `itertools.product` over the dimensions below, then a fixed-seed sample
(broad: everything, tricks included; focused: well-formed paths with working credentials,
so that enough cases are forwarded to compare identity headers and upstream paths; cors: the
/app route, where the Origin check applies, with every Origin).
CORS preflights (OPTIONS + Access-Control-Request-Method) are not in the table: the proxy
answers them itself and explain does not model them. No case sends a body.

Two layouts: `prefixes` (unknown prefixes are 404 `no_route`) and `catch-all` (the same plus a
route at prefix `/`, which then takes every unknown prefix).

Paths under `/.gateway/` are in the table too: the decision refuses them first (404 `no_route`),
so explain and the proxy agree there even with a route at `/`.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.explain import explain_request, parse_target
from gateway.logs import ACCESS_LOGGER
from tests.conftest import Harness
from tests.upstream import SEEN

APP = "http://app.example:3000"  # alice's and bob's allowed origin
WILD = "https://wild.example"  # wild's allowed origin
FIXED = "http://fixed.example:8000"  # the /app route's fixed `extra` origin: every user
OTHER = "http://other.example"  # allowed for nobody

POLICIES = """
roles:
  service-user-project-admin:
    description: Every permission
    permissions: ["*"]
  reader:
    permissions: ["echo:read"]
  writer:
    includes: [reader]
    permissions: ["echo:write"]
  echo-all:
    permissions: ["echo:*"]
  other:
    permissions: ["other:read"]
  app-reader:
    permissions: ["app:read"]
  app-user:
    includes: [app-reader]
    permissions: ["app:write"]
  api-admin:
    permissions: ["api:*"]
  api-reader:
    permissions: ["api:items:read"]
routes:
  echo:
    rules:
      - methods: [POST]
        paths: ["/echo/hook"]
        public: true
      - methods: [GET, HEAD]
        paths: ["/echo/*/status"]
        require: "echo:status"
      - methods: [GET, HEAD]
        paths: ["/echo/**"]
        require: "echo:read"
      - methods: [POST, PUT, PATCH, DELETE]
        paths: ["/echo/**"]
        require: "echo:write"
  deep:
    rules:
      - paths: ["/echo/deep/**"]
        require: "other:read"
  strip:
    rules:
      - methods: [GET, HEAD]
        paths: ["/strip", "/strip/*"]
        require: "echo:read"
      - methods: [DELETE]
        paths: ["/strip/**"]
        require: "echo:write"
  browser:
    rules:
      - methods: [POST]
        paths: ["/app/public"]
        public: true
      - methods: [GET, HEAD, OPTIONS]
        paths: ["/app/**"]
        require: "app:read"
      - methods: [POST, PUT, PATCH, DELETE]
        paths: ["/app/items/*"]
        require: "app:write"
  api:
    rules:
      - methods: [GET, HEAD]
        paths: ["/api/v1/**/health/**"]
        public: true
      - methods: [GET, HEAD]
        paths: ["/api/v1/items/**"]
        require: "api:items:read"
      - paths: ["/api/v1/admin/**/audit"]
        require: "api:admin"
"""

# The catch-all layout: a route at "/" that takes every path no longer prefix matches.
ROOT_RULES = """
  root:
    rules:
      - methods: [GET, HEAD]
        paths: ["/**"]
        public: true
      - paths: ["/**"]
        require: "root:any"
"""

ROOT_ROUTE = """\
  - name: root
    prefix: /
    upstream: "{upstream}"
"""

LAYOUTS = ("prefixes", "catch-all")

# A fifth route next to write_config's echo (/echo), deep (/echo/deep), strip (/strip,
# strip_prefix) and browser (/app, cors): a two-segment prefix, stripped. The comment line
# keeps textwrap.dedent in write_config from moving the list item out of `routes:`.
EXTRA_ROUTES = """\
# added by test_explain_equivalence
  - name: api
    prefix: /api/v1
    upstream: "{upstream}"
    strip_prefix: true
"""

IDENTITY_HEADERS = ("X-Service-User", "X-Service-User-Roles", "X-Service-Token-Id")

PATHS = (
    # echo (/echo)
    "/echo",
    "/echo/",
    "/echo/items/42",
    "/echo/hook",
    "/echo/x/status",
    "/echo/x/y/status",
    "/echo/items?q=1&next=%2F&x=..",
    "/echo/items?bad=%zz&sp=a+b&;",
    "/echo/caf%C3%A9/a%20b",
    "/echo/%41BC/%7Euser",
    "/%65cho/items",
    "/echo/it'em(s)!:@",
    # deep (/echo/deep, the longer prefix)
    "/echo/deep",
    "/echo/deep/a/b",
    # strip (/strip, strip_prefix)
    "/strip",
    "/strip/",
    "/strip/one",
    "/strip/one/two?keep=%2F",
    "/%73trip/one",
    "/strip/%73ub",
    # browser (/app, cors)
    "/app",
    "/app/public",
    "/app/items/7",
    "/app/items/7/sub",
    # api (/api/v1, strip_prefix)
    "/api/v1",
    "/api/v1/items/9",
    "/api/v1/svc/health/live",
    "/api/v1/admin/x/y/audit",
    "/api/v1/admin/audit",
    # tricks: dot segments, encoded slash, ';', '//', bad escapes
    "/echo/a/../hook",
    "/echo/%2e%2e/x",
    "/echo/./items",
    "/echo/a%2Fb",
    "/echo%2Fitems",
    "/echo/a%5Cb",
    "/echo/a;b",
    "/echo/;jsessionid=1",
    "/echo//a",
    "/app/a//b",
    "/echo/%zz",
    "/echo/%C3",
    "/echo/deep/../x",
    "/strip/..",
    "/strip;x/one",
    "/api/v1/items/%2e/9",
    # unknown prefixes
    "/",
    "/unknown/x",
    "/echoes/x",
    "/ECHO/items",
    "/api/v2/items",
    "/.gateway/nothing",
    "/%2Egateway/x",
    "/%2egateway/a/../b",
)

# Well-formed paths on known routes: the focused table.
ROUTED = PATHS[: PATHS.index("/echo/a/../hook")]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")

ORIGINS: tuple[str | None, ...] = (
    None,
    APP,
    "HTTP://APP.EXAMPLE:3000",  # APP, spelt differently: normalised before comparison
    FIXED,
    WILD,
    OTHER,
    "null",  # sandboxed iframes and file:// pages send this
    "not an origin",
    "http://app.example:3000/path",
)

# Credentials, by the name the table uses (see `make_credentials`).
WHO = (
    "none",  # no Authorization header
    "junk",  # "gw_" and junk: no token the gateway issued
    "alice",  # writer + app-user, token follows the user's roles; origins [APP]
    "bob-subset",  # writer + app-user + other + api-reader, token fixed to [reader, app-reader]
    "wild",  # echo-all (echo:*) + api-admin (api:*); origins [WILD]
    "root",  # service-user-project-admin (*); no origins
    "empty",  # a user without roles; origins [APP]
    "shrunk",  # a token whose only role was removed from its user: carries []
    "disabled",  # a disabled user's token
    "expired",  # alice's expired token
    "reset",  # alice's token's old secret, after a reset
    "admin",  # an admin identity's token
)
GOOD = ("alice", "bob-subset", "wild", "root", "empty", "shrunk")

BROAD_SAMPLE = 220
FOCUSED_SAMPLE = 160
CORS_SAMPLE = 100
SEED = 20240611


@dataclass(frozen=True)
class Case:
    """One request: method, raw path (with query), who sends it, its Origin header."""

    method: str
    path: str
    who: str
    origin: str | None

    def __str__(self) -> str:
        origin = "no Origin" if self.origin is None else f"Origin {self.origin!r}"
        return f"{self.method} {self.path} as {self.who}, {origin}"


def sample(product: list[Case], size: int, seed: int) -> list[Case]:
    """A fixed-seed sample of `product` (all of it when it is small enough)."""
    if len(product) <= size:
        return product
    return random.Random(seed).sample(product, size)


def build_cases() -> list[Case]:
    broad = [Case(*values) for values in itertools.product(METHODS, PATHS, WHO, ORIGINS)]
    focused = [
        Case(*values)
        for values in itertools.product(
            ("GET", "HEAD", "POST", "DELETE", "OPTIONS"), ROUTED, GOOD, (None, APP, FIXED, WILD)
        )
    ]
    cors = [
        Case(*values)
        for values in itertools.product(
            ("GET", "HEAD", "POST", "PUT", "OPTIONS"),
            [path for path in PATHS if path.startswith("/app")],
            ("none", "alice", "bob-subset", "root", "disabled"),  # the ones that reach the check
            ORIGINS,
        )
    ]
    chosen = (
        set(sample(broad, BROAD_SAMPLE, SEED))
        | set(sample(focused, FOCUSED_SAMPLE, SEED + 1))
        | set(sample(cors, CORS_SAMPLE, SEED + 2))
    )
    return sorted(chosen, key=lambda case: (case.path, case.method, case.who, case.origin or ""))


CASES = build_cases()


def is_gateway_path(path: str) -> bool:
    """Whether the first segment of `path`, percent-decoded, is `.gateway` (the gateway's own)."""
    first = path.split("?", 1)[0][1:].split("/", 1)[0]
    try:
        first = unquote(first, errors="strict")
    except UnicodeDecodeError:
        pass
    return first == ".gateway"


@dataclass(frozen=True)
class ProxyOutcome:
    """What the proxy did with a request, seen from the client and the upstream."""

    forwarded: bool
    status: int
    error: str | None  # the refusal's JSON error code (None when forwarded)
    route: str | None  # the access-log line's route name
    upstream_target: str | None  # raw path and query the upstream received
    identity: dict[str, list[str]] | None  # identity headers the upstream received (all values)


async def make_credentials(h: Harness) -> dict[str, str | None]:
    """Create the users and tokens of `WHO`; return each one's bearer secret (None: no header)."""
    d = h.directory
    await d.create_user("alice", actor="test", roles=["writer", "app-user"], origins=[APP])
    _, alice = await d.create_token("alice", "main", actor="test")
    _, expired = await d.create_token("alice", "old", actor="test")
    await d.expire_token("alice", "old", actor="test")
    _, before_reset = await d.create_token("alice", "rotated", actor="test")
    await d.reset_token("alice", "rotated", actor="test")

    await d.create_user(
        "bob-subset", actor="test", roles=["writer", "app-user", "other", "api-reader"], origins=[APP]
    )
    _, bob = await d.create_token("bob-subset", "narrow", actor="test", roles=["reader", "app-reader"])

    await d.create_user("wild", actor="test", roles=["echo-all", "api-admin"], origins=[WILD])
    _, wild = await d.create_token("wild", "main", actor="test")

    await d.create_user("root", actor="test", roles=["service-user-project-admin"])
    _, root = await d.create_token("root", "main", actor="test")

    await d.create_user("empty", actor="test", roles=[], origins=[APP])
    _, empty = await d.create_token("empty", "main", actor="test")

    await d.create_user("shrunk", actor="test", roles=["writer", "other"], origins=[APP])
    _, shrunk = await d.create_token("shrunk", "main", actor="test", roles=["other"])
    await d.update_user("shrunk", actor="test", remove_roles=["other"])

    await d.create_user("gone", actor="test", roles=["writer", "app-user"], origins=[APP])
    _, disabled = await d.create_token("gone", "main", actor="test")
    await d.update_user("gone", actor="test", disabled=True)

    await d.create_user("boss", actor="test", admin=True)
    _, admin = await d.create_token("boss", "main", actor="test")

    await h.settle()
    return {
        "none": None,
        "junk": "gw_" + "A" * 50,
        "alice": alice,
        "bob-subset": bob,
        "wild": wild,
        "root": root,
        "empty": empty,
        "shrunk": shrunk,
        "disabled": disabled,
        "expired": expired,
        "reset": before_reset,
        "admin": admin,
    }


def access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The proxy's access-log fields for `request_id`."""
    for record in reversed(caplog.records):
        fields = record.msg
        if record.name == ACCESS_LOGGER and isinstance(fields, dict) and fields["request_id"] == request_id:
            return fields
    raise AssertionError(f"no access-log line for request {request_id}")


async def through_proxy(
    h: Harness, case: Case, secret: str | None, caplog: pytest.LogCaptureFixture
) -> ProxyOutcome:
    """Send `case` through the proxy, byte for byte; report what happened."""
    seen: list[web.Request] = h.upstream_app[SEEN]
    seen.clear()
    headers = {"X_Service_User": "spoofed", "X-Service-User-Roles": "service-user-project-admin"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    if case.origin is not None:
        headers["Origin"] = case.origin
    response = await h.send(case.method, case.path, headers=headers)
    async with response:
        body = await response.read()
        status = response.status
        request_id = response.headers["X-Request-Id"]
        content_type = response.content_type
    line = access_line(caplog, request_id)
    assert line["status"] == status, f"{case}: access log says {line['status']}, client got {status}"
    assert len(seen) <= 1, f"{case}: the upstream received {len(seen)} requests"
    if seen:
        received = seen[0]
        identity = {name: received.headers.getall(name, []) for name in IDENTITY_HEADERS}
        return ProxyOutcome(True, status, None, line["route"], received.raw_path, identity)
    error = line["error"]
    if body:  # HEAD answers have no body; the log line has the code then
        assert content_type == "application/json", f"{case}: refusal is {content_type}: {body!r}"
        answer = json.loads(body)
        assert answer["error"] == error, f"{case}: body says {answer['error']}, log says {error}"
    return ProxyOutcome(False, status, error, line["route"], None, None)


async def explained(h: Harness, case: Case, secret: str | None) -> dict[str, Any]:
    """Explain `case` with the running gateway's settings, store, token cache and origins."""
    gateway = h.gateway
    trace = await explain_request(
        gateway.pipeline.settings,
        h.directory,
        gateway.authenticator,
        gateway.origins,
        parse_target(case.method, case.path, case.origin),
        token=secret,
        user=None,
    )
    return trace.to_json()


def disagreements(case: Case, proxy: ProxyOutcome, trace: dict[str, Any], upstream_base: str) -> list[str]:
    """Every way `trace` (explain) differs from `proxy`; empty when they agree."""
    decision = trace["decision"]
    found: list[str] = []
    route_step = next(step for step in trace["steps"] if step["step"] == "route")
    if decision["allowed"] != proxy.forwarded:
        found.append(
            f"explain allowed={decision['allowed']} ({decision['status']} {decision['error']}), "
            f"proxy forwarded={proxy.forwarded} ({proxy.status} {proxy.error})"
        )
    elif not proxy.forwarded:
        if (decision["status"], decision["error"]) != (proxy.status, proxy.error):
            found.append(
                f"explain refuses {decision['status']} {decision['error']}, "
                f"proxy refused {proxy.status} {proxy.error}"
            )
    else:
        if proxy.status != 200:
            found.append(f"the echo upstream answered {proxy.status}")
        expected_target = upstream_base + (proxy.upstream_target or "")
        if decision["upstream"] != expected_target:
            found.append(f"explain predicts upstream {decision['upstream']}, upstream got {expected_target}")
        predicted = decision["identity_headers"]
        expected = (
            {name: [] for name in IDENTITY_HEADERS}
            if predicted is None
            else {name: [predicted[name]] for name in IDENTITY_HEADERS}
        )
        if proxy.identity != expected:
            found.append(f"explain predicts identity {predicted}, upstream got {proxy.identity}")
    route = route_step.get("route")  # absent when an earlier step refused (the method)
    if route != proxy.route:
        found.append(f"explain chose route {route}, proxy logged {proxy.route}")
    return found


async def start(
    make_harness: Callable[..., Awaitable[Harness]], upstream: TestServer, layout: str
) -> tuple[Harness, str]:
    """The gateway for `layout`, with its upstream's base URL."""
    base = str(upstream.make_url("")).rstrip("/")
    routes = EXTRA_ROUTES + (ROOT_ROUTE if layout == "catch-all" else "")
    policies = POLICIES + (ROOT_RULES if layout == "catch-all" else "")
    h = await make_harness(policies=policies, extra_yaml=routes.format(upstream=base))
    return h, base


async def compare(
    h: Harness, case: Case, secrets: dict[str, str | None], caplog: pytest.LogCaptureFixture, base: str
) -> tuple[ProxyOutcome, list[str]]:
    """Run `case` through the proxy, then explain it; (the proxy's outcome, the disagreements)."""
    secret = secrets[case.who]
    proxy = await through_proxy(h, case, secret, caplog)
    trace = await explained(h, case, secret)
    caplog.clear()
    return proxy, disagreements(case, proxy, trace, base)


REFUSALS = {
    "bad_request",
    "missing_token",
    "invalid_token",
    "token_expired",
    "user_disabled",
    "forbidden",
    "origin_not_allowed",
    "method_not_allowed",
}


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_explain_decides_every_case_as_the_proxy_does(
    make_harness: Callable[..., Awaitable[Harness]],
    upstream: TestServer,
    caplog: pytest.LogCaptureFixture,
    layout: str,
) -> None:
    assert len(CASES) >= 50
    h, base = await start(make_harness, upstream, layout)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    secrets = await make_credentials(h)

    problems: list[str] = []  # one line per case that fails
    forwarded = 0
    codes: Counter[str] = Counter()
    for case in CASES:
        proxy, found = await compare(h, case, secrets, caplog, base)
        if found:
            problems.append(f"{case}: " + "; ".join(found))
        forwarded += proxy.forwarded
        codes[proxy.error or "forwarded"] += 1

    assert not problems, (
        f"{layout}: explain and the proxy disagree on {len(problems)} of {len(CASES)} cases:\n"
        + "\n".join(problems)
    )
    # The table must exercise both sides and every refusal the decision can give here.
    assert forwarded >= 60 and codes["origin_not_allowed"] >= 15, codes
    expected = REFUSALS | ({"no_route"} if layout == "prefixes" else set())
    assert expected <= set(codes), codes


GATEWAY_PATH_CASES = [
    ("prefixes", Case("TRACE", "/.gateway/nothing", "alice", None)),
    ("prefixes", Case("TRACE", "/%2Egateway/x", "none", APP)),
    ("catch-all", Case("GET", "/.gateway/nothing", "none", None)),
    ("catch-all", Case("HEAD", "/%2Egateway/jwks.json", "alice", None)),
    # /.gateway/token and /.gateway/jwks.json are the gateway's own endpoints (the proxy answers
    # them, explain says they are never forwarded): not comparable here, a near miss is.
    ("catch-all", Case("POST", "/.gateway/tokens", "root", None)),
    ("catch-all", Case("DELETE", "/.gateway/x", "none", None)),
    ("catch-all", Case("PUT", "/.gateway/x", "alice", None)),
    ("catch-all", Case("GET", "/%2egateway/a/../b", "none", None)),
]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)  # not the store's business
@pytest.mark.parametrize(
    ("layout", "case"),
    [
        pytest.param(
            layout,
            case,
            id=f"{layout}-{case.method}-{case.path}-{case.who}",
        )
        for layout, case in GATEWAY_PATH_CASES
    ],
)
async def test_gateway_paths_are_explained_as_the_proxy_answers_them(
    make_harness: Callable[..., Awaitable[Harness]],
    upstream: TestServer,
    caplog: pytest.LogCaptureFixture,
    layout: str,
    case: Case,
) -> None:
    assert is_gateway_path(case.path)
    h, base = await start(make_harness, upstream, layout)
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    secrets = await make_credentials(h)
    proxy, found = await compare(h, case, secrets, caplog, base)
    assert not proxy.forwarded, f"{case}: the proxy forwarded a /.gateway/ path"
    assert not found, f"{case}: " + "; ".join(found)
