"""Rate limits (CONTRACT "Rate limits"): per-user, per-route and auth-failure limits, in process.

The real gateway (tests/conftest.py `make_harness`) in front of the real echo upstream
(tests/upstream.py, which records every request it receives in `SEEN`, plus a hook that makes
it send its own RateLimit headers when asked) on a SQLite store. Every test that counts runs
twice: on the `memory` rate-limit store and on the real Redis (a flushed database from the
`redis_url` fixture; set GATEWAY_TEST_REDIS_DB to run beside another test run).

Timing: limits whose refill matters use a 1 s interval; every other limit uses intervals of
20 s or more, so nothing refills while a test runs. `t` and `Retry-After` are whole seconds
rounded up, so a value of N s may read N - 1 on a machine slow enough to let a second pass
between two requests of one test; `RATE_SLACK` allows exactly that, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import tokens
from gateway.admin import build_admin_app
from gateway.config import RateLimitConfig, load_config
from gateway.errors import ConfigError
from gateway.limiter import Check, MemoryStore, RateLimiter, RedisStore
from gateway.metrics import Metrics
from gateway.ratelimit import Verdict, make_limit
from tests.conftest import Harness
from tests.upstream import SEEN, build_upstream

MakeHarness = Callable[..., Awaitable[Harness]]

AUTHZ = "/.gateway/authz"
TOKEN = "/.gateway/token"
PEERS = "forward_auth:\n  peers: [127.0.0.1/32]\n"
RATE_SLACK = 1  # seconds a `t` / Retry-After of 2 s or more may have lost to a slow machine
ITEM = r'"([a-z]+)";r=([0-9]+);t=([0-9]+)'
STATE_RE = re.compile(rf"{ITEM}(?:, {ITEM})*")
# What the upstream sends of its own when the query asks (`?own_limits=1`).
UPSTREAM_POLICY = '"upstream";q=100;w=60'
UPSTREAM_STATE = '"upstream";r=42;t=0'


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """The gateway's store: a SQLite file only (the limits do not depend on the store)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"


async def _own_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    if "own_limits" in request.query:
        response.headers.add("RateLimit-Policy", UPSTREAM_POLICY)
        response.headers.add("RateLimit", UPSTREAM_STATE)


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """tests/upstream.py's echo app, which also sends its own RateLimit headers on `?own_limits`."""
    app = build_upstream()
    app.on_response_prepare.append(_own_rate_headers)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture(params=["memory", "redis"])
def rate_store(request: pytest.FixtureRequest) -> str:
    """`rate_limits.store`: each process's memory, or a flushed database of the real Redis."""
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue("redis_url"))


# -- helpers ----------------------------------------------------------------------------------


def limits(store: str, **blocks: str) -> str:
    """A `rate_limits` block: `limits(store, per_user="{rate: 1, per: 1s}")`."""
    lines = [f"  {name}: {value}\n" for name, value in blocks.items()]
    return f'rate_limits:\n  store: "{store}"\n' + "".join(lines)


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None

    def __str__(self) -> str:
        return f"{self.status} {list(self.headers.items())} {self.body!r}"


async def send(
    harness: Harness,
    path: str,
    token: str | None = None,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | CIMultiDict[str] | None = None,
    data: Any = None,
) -> Reply:
    """One request to the proxy listener (with `Authorization: Bearer token` when given)."""
    sent = CIMultiDict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with harness.client.request(method, path, headers=sent, data=data) as response:
        text = await response.text()
        body = json.loads(text) if text else None
        return Reply(response.status, response.headers, body)


async def start(make_harness: MakeHarness, rate_store: str, **options: str) -> Harness:
    """The gateway of `make_harness(**options)`, whose `rate_limits.store` is `rate_store`.

    On Redis, the limiter's store is replaced by the same real RedisStore with a 5 s wait
    instead of the gateway's 0.25 s: on a loaded machine a slow answer would otherwise be taken
    for an outage (`on_store_error`), which these tests are not about (see the last test here
    and tests/integration/test_rate_limits_redis.py for outages).
    """
    harness = await make_harness(**options)
    if rate_store != "memory":
        limiter = harness.gateway.limiter
        assert isinstance(limiter.store, RedisStore)
        await limiter.store.close()
        limiter.store = RedisStore(rate_store, timeout=5.0)
    return harness


def upstream_seen(harness: Harness) -> int:
    """How many requests the real upstream has received."""
    return len(harness.upstream_app[SEEN])


def state_of(reply: Reply) -> list[tuple[str, int, int]]:
    """The gateway's `RateLimit` line (the last one), checked against the draft's syntax."""
    lines = reply.headers.getall("RateLimit", [])
    assert lines, f"no RateLimit header: {reply}"
    line = lines[-1]
    assert STATE_RE.fullmatch(line), f"not the draft's syntax: {line!r}"
    items = re.findall(ITEM, line)
    return [(name, int(r), int(t)) for name, r, t in items]


def assert_limits(reply: Reply, policy: str, state: list[tuple[str, int, int]]) -> None:
    """Exactly one gateway RateLimit-Policy/RateLimit pair with these values; on a 429 also
    Retry-After (whole seconds, at least 1, the wait of the policy that refused)."""
    assert reply.headers.getall("RateLimit-Policy") == [policy], str(reply)
    assert len(reply.headers.getall("RateLimit")) == 1, str(reply)
    got = state_of(reply)
    assert [(name, r) for name, r, _ in got] == [(name, r) for name, r, _ in state], f"{got} != {state}"
    for (name, _, t), (_, _, expected) in zip(got, state, strict=True):
        low = expected - RATE_SLACK if expected >= 2 else expected
        assert low <= t <= expected, f"{name}: t={t}, expected {expected}: {reply}"
    if reply.status == 429:
        retry = reply.headers.getall("Retry-After")
        assert len(retry) == 1 and retry[0].isdigit() and int(retry[0]) >= 1, str(reply)
        assert int(retry[0]) == max(t for _, _, t in got), str(reply)
    else:
        assert "Retry-After" not in reply.headers, str(reply)


def assert_no_limits(reply: Reply) -> None:
    for name in ("RateLimit-Policy", "RateLimit", "Retry-After"):
        assert name not in reply.headers, str(reply)


def assert_rate_limited(reply: Reply) -> None:
    assert (reply.status, reply.error) == (429, "rate_limited"), str(reply)


def retry_after(reply: Reply) -> int:
    return int(reply.headers["Retry-After"])


def well_formed_guess() -> str:
    """A token of the right shape and checksum that no store holds (its check reaches the store)."""
    return tokens.generate()


def metric(harness: Harness, sample: str) -> float:
    """The value of one sample line of the gateway's /metrics text (0 when absent)."""
    for line in harness.gateway.metrics.render().decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


# -- 1. burst, refusal, refill ---------------------------------------------------------------


async def test_a_burst_is_admitted_whole_then_429_that_never_reaches_the_upstream_or_consumes(
    make_harness: MakeHarness, rate_store: str
) -> None:
    # One request a second, two at once: the refill after the burst is exactly 1 s away.
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, per_user="{rate: 1, per: 1s, burst: 2}")
    )
    token = await harness.token("alice")
    before = upstream_seen(harness)

    first = await send(harness, "/echo/a", token)
    assert first.status == 200, str(first)
    # Exact strings of draft-ietf-httpapi-ratelimit-headers-10 as the gateway writes them.
    assert first.headers.getall("RateLimit-Policy") == ['"user";q=2;w=2']
    assert first.headers.getall("RateLimit") == ['"user";r=1;t=0']
    second = await send(harness, "/echo/a", token)
    assert second.status == 200, str(second)
    assert second.headers.getall("RateLimit") == ['"user";r=0;t=1']
    assert upstream_seen(harness) == before + 2

    for _ in range(3):
        refused = await send(harness, "/echo/a", token)
        assert_rate_limited(refused)
        assert refused.headers.getall("Retry-After") == ["1"]  # the 1 s refill, rounded up
        assert refused.headers.getall("RateLimit-Policy") == ['"user";q=2;w=2']
        assert refused.headers.getall("RateLimit") == ['"user";r=0;t=1']
        assert refused.headers["Content-Type"].startswith("application/json")
    assert upstream_seen(harness) == before + 2  # no refused request reached the upstream

    # The refusals consumed nothing: after Retry-After exactly one more is admitted.
    await asyncio.sleep(retry_after(refused))
    again = await send(harness, "/echo/a", token)
    assert again.status == 200, str(again)
    assert again.headers.getall("RateLimit") == ['"user";r=0;t=1']
    assert_rate_limited(await send(harness, "/echo/a", token))
    assert upstream_seen(harness) == before + 3


# -- 2. headers on allowed answers, after the upstream's own -----------------------------------


async def test_allowed_answers_carry_the_headers_after_the_upstreams_own(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(rate_store, per_user="{rate: 3, per: 1m}"),
        route_options="rate_limit: {rate: 2, per: 1m, burst: 2}",
    )
    token = await harness.token("alice")
    reply = await send(harness, "/echo/a?own_limits=1", token)
    assert reply.status == 200, str(reply)
    assert reply.headers.getall("RateLimit-Policy") == [
        UPSTREAM_POLICY,
        '"user";q=3;w=60, "route";q=2;w=60',
    ]
    assert reply.headers.getall("RateLimit") == [UPSTREAM_STATE, '"user";r=2;t=0, "route";r=1;t=0']
    assert "Retry-After" not in reply.headers
    # Without the upstream's own, just the gateway's; the body is the upstream's, untouched.
    reply = await send(harness, "/echo/b", token)
    assert reply.status == 200 and reply.body["raw_path"] == "/echo/b", str(reply)
    assert_limits(reply, '"user";q=3;w=60, "route";q=2;w=60', [("user", 1, 0), ("route", 0, 30)])
    assert len(reply.headers.getall("RateLimit")) == 1
    # The upstream never sees the gateway's rate headers in the request.
    names = {name.lower() for name, _ in reply.body["headers"]}
    assert not names & {"ratelimit", "ratelimit-policy"}


# -- 3. per-user and route limits together --------------------------------------------------


async def test_user_and_route_limits_apply_together_and_a_refusal_consumes_from_neither(
    make_harness: MakeHarness, rate_store: str
) -> None:
    # echo: 2 per user; browser (/app): 1 per user (the indented first line of extra_yaml
    # continues the harness's last route, `browser`); strip: no route limit. 3 per user in all.
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml="    rate_limit: {rate: 1, per: 1m, burst: 1}\n"
        + limits(rate_store, per_user="{rate: 3, per: 1m, burst: 3}"),
        route_options="rate_limit: {rate: 2, per: 1m, burst: 2}",
    )
    alice = await harness.token("alice")
    bob = await harness.token("bob")
    echo = '"user";q=3;w=60, "route";q=2;w=60'
    app = '"user";q=3;w=60, "route";q=1;w=60'
    before = upstream_seen(harness)

    reply = await send(harness, "/echo/a", alice)
    assert_limits(reply, echo, [("user", 2, 0), ("route", 1, 0)])
    reply = await send(harness, "/echo/a", alice)
    assert_limits(reply, echo, [("user", 1, 0), ("route", 0, 30)])
    # The route is the tighter one: it refuses, and the user's share is left untouched (r=1).
    for _ in range(2):
        reply = await send(harness, "/echo/a", alice)
        assert_rate_limited(reply)
        assert_limits(reply, echo, [("user", 1, 0), ("route", 0, 30)])
    assert upstream_seen(harness) == before + 2

    # Another route: its own route counter (fresh), the same user counter (one left, not zero).
    reply = await send(harness, "/app/x", alice)
    assert reply.status == 200, str(reply)
    assert_limits(reply, app, [("user", 0, 20), ("route", 0, 60)])
    # A route without a limit: only the user's, now spent.
    reply = await send(harness, "/strip/x", alice)
    assert_rate_limited(reply)
    assert_limits(reply, '"user";q=3;w=60', [("user", 0, 20)])

    # bob has counters of his own, on both policies.
    reply = await send(harness, "/echo/a", bob)
    assert_limits(reply, echo, [("user", 2, 0), ("route", 1, 0)])
    reply = await send(harness, "/strip/x", bob)
    assert_limits(reply, '"user";q=3;w=60', [("user", 1, 0)])
    reply = await send(harness, "/strip/x", bob)
    assert_limits(reply, '"user";q=3;w=60', [("user", 0, 20)])
    # Now the user refuses and the route would admit: the route keeps its share (r=1), every time.
    for _ in range(3):
        reply = await send(harness, "/echo/a", bob)
        assert_rate_limited(reply)
        assert_limits(reply, echo, [("user", 0, 20), ("route", 1, 0)])
    assert upstream_seen(harness) == before + 2 + 1 + 3


async def test_a_request_refused_before_the_limit_step_consumes_nothing(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(rate_store, per_user="{rate: 1, per: 1m, burst: 1}"),
        route_options="rate_limit: {rate: 1, per: 1m, burst: 1}",
    )
    reader = await harness.token("reader-only", roles=["reader"])
    # 403 (no echo:write) comes before the limit step: no headers, nothing counted.
    for _ in range(3):
        reply = await send(harness, "/echo/a", reader, method="POST")
        assert (reply.status, reply.error) == (403, "forbidden"), str(reply)
        assert_no_limits(reply)
    reply = await send(harness, "/echo/a", reader)
    assert reply.status == 200, str(reply)
    assert_limits(reply, '"user";q=1;w=60, "route";q=1;w=60', [("user", 0, 60), ("route", 0, 60)])


# -- 4. public rules ----------------------------------------------------------------------------


async def test_public_rules_are_not_limited_and_never_meet_auth_failures(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(
            rate_store,
            per_user="{rate: 1, per: 1m, burst: 1}",
            auth_failures="{rate: 1, per: 1m, burst: 2}",
        ),
        route_options="rate_limit: {rate: 1, per: 1m, burst: 1}",
    )
    token = await harness.token("alice")
    # POST /echo/hook is public: no user, so neither per_user nor the route's limit applies,
    # and a credential sent there (valid or not) is not checked, so it is no failed check.
    for credential in (token, None, well_formed_guess(), "gw_nonsense") * 3:
        reply = await send(harness, "/echo/hook", credential, method="POST")
        assert reply.status == 200, str(reply)
        assert_no_limits(reply)
    # Nothing of that counted: the user still has its burst, the address all its failures.
    reply = await send(harness, "/echo/a", token)
    assert_limits(reply, '"user";q=1;w=60, "route";q=1;w=60', [("user", 0, 60), ("route", 0, 60)])
    reply = await send(harness, "/echo/a", "gw_nonsense")
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert_limits(reply, '"auth";q=2;w=120', [("auth", 1, 0)])
    reply = await send(harness, "/echo/a", well_formed_guess())
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert_limits(reply, '"auth";q=2;w=120', [("auth", 0, 60)])
    # The address is blocked for what needs a credential, but a public rule still answers.
    reply = await send(harness, "/echo/a", token)
    assert_rate_limited(reply)
    assert_limits(reply, '"auth";q=2;w=120', [("auth", 0, 60)])
    for _ in range(3):
        reply = await send(harness, "/echo/hook", token, method="POST")
        assert reply.status == 200, str(reply)
        assert_no_limits(reply)


# -- 5. auth_failures -------------------------------------------------------------------------


async def test_failed_credential_checks_block_the_address_before_its_credential_is_looked_at(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 3}")
    )
    token = await harness.token("alice")
    other = await harness.token("bob")
    authenticator = harness.gateway.authenticator
    policy = '"auth";q=3;w=180'
    before = upstream_seen(harness)

    # No credential at all guesses nothing: missing_token never counts (nor carries "auth").
    for _ in range(5):
        reply = await send(harness, "/echo/a")
        assert (reply.status, reply.error) == (401, "missing_token"), str(reply)
        assert_no_limits(reply)

    reply = await send(harness, "/echo/a", "gw_" + "x" * 10)  # malformed: refused by its shape
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'
    assert_limits(reply, policy, [("auth", 2, 0)])
    misses = authenticator.cache_misses
    reply = await send(harness, "/echo/a", well_formed_guess())  # well-formed: looked up in the store
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert_limits(reply, policy, [("auth", 1, 0)])
    assert authenticator.cache_misses == misses + 1
    reply = await send(harness, "/echo/a", "Bearer-ish")  # not even a gw_ prefix
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert_limits(reply, policy, [("auth", 0, 60)])

    # Blocked: a valid token too, and a request without one, get 429 with the "auth" policy.
    for credential in (token, other, None):
        reply = await send(harness, "/echo/a", credential)
        assert_rate_limited(reply)
        assert_limits(reply, policy, [("auth", 0, 60)])
    assert upstream_seen(harness) == before

    # More guesses never reach the store: no token-cache miss, no lookup, no 401.
    misses, hits = authenticator.cache_misses, authenticator.cache_hits
    for _ in range(10):
        reply = await send(harness, "/echo/a", well_formed_guess())
        assert_rate_limited(reply)
        assert_limits(reply, policy, [("auth", 0, 60)])
    assert (authenticator.cache_misses, authenticator.cache_hits) == (misses, hits)
    assert upstream_seen(harness) == before


TRUSTED = "trusted_proxies: [127.0.0.0/8]\n"


async def test_behind_a_trusted_proxy_each_real_client_is_counted_alone(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=TRUSTED + limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 2}"),
    )
    token = await harness.token("alice")
    policy = '"auth";q=2;w=120'

    def via(*entries: str) -> dict[str, str]:
        return {"X-Forwarded-For": ", ".join(entries)}

    a, b = "203.0.113.7", "203.0.113.8"
    reply = await send(harness, "/echo/a", well_formed_guess(), headers=via(a))
    assert_limits(reply, policy, [("auth", 1, 0)])
    reply = await send(harness, "/echo/a", well_formed_guess(), headers=via(a))
    assert_limits(reply, policy, [("auth", 0, 60)])
    assert_rate_limited(await send(harness, "/echo/a", token, headers=via(a)))

    # Another client behind the same proxy is not blocked, and has a counter of its own.
    reply = await send(harness, "/echo/a", token, headers=via(b))
    assert reply.status == 200, str(reply)
    assert_no_limits(reply)  # a valid credential counts nothing (and no per-user limit is set)
    reply = await send(harness, "/echo/a", well_formed_guess(), headers=via(b))
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert_limits(reply, policy, [("auth", 1, 0)])

    # What the client wrote itself (left of the proxy's entry) changes nothing; neither does a
    # second trusted proxy hop to the right of the client.
    for entries in ((b, a), ("198.51.100.1", "10.9.9.9", a), (a, "127.0.0.9"), (b, a, "127.0.0.2")):
        reply = await send(harness, "/echo/a", token, headers=via(*entries))
        assert_rate_limited(reply)
        assert_limits(reply, policy, [("auth", 0, 60)])
    # Several X-Forwarded-For lines are one list (the proxy's line comes last).
    reply = await send(
        harness, "/echo/a", token, headers=CIMultiDict([("X-Forwarded-For", b), ("X-Forwarded-For", a)])
    )
    assert_rate_limited(reply)
    reply = await send(
        harness, "/echo/a", token, headers=CIMultiDict([("X-Forwarded-For", a), ("X-Forwarded-For", b)])
    )
    assert reply.status == 200, str(reply)
    # The proxy itself, with no X-Forwarded-For, is a client of its own.
    reply = await send(harness, "/echo/a", token)
    assert reply.status == 200, str(reply)
    reply = await send(harness, "/echo/a", token, headers=via(b, "127.0.0.3"))
    assert reply.status == 200, str(reply)


async def test_without_trusted_proxies_x_forwarded_for_cannot_dodge_the_limit(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 2}")
    )
    token = await harness.token("alice")
    policy = '"auth";q=2;w=120'
    reply = await send(harness, "/echo/a", well_formed_guess(), headers={"X-Forwarded-For": "203.0.113.7"})
    assert_limits(reply, policy, [("auth", 1, 0)])
    reply = await send(harness, "/echo/a", well_formed_guess(), headers={"X-Forwarded-For": "203.0.113.8"})
    assert_limits(reply, policy, [("auth", 0, 60)])  # the same peer: the same counter
    for forwarded in ("198.51.100.9", "2001:db8::1", "unknown", None):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        reply = await send(harness, "/echo/a", token, headers=headers)
        assert_rate_limited(reply)
        assert_limits(reply, policy, [("auth", 0, 60)])


# -- 6. the token endpoint ----------------------------------------------------------------------


async def test_wrong_secrets_at_the_token_endpoint_count_and_a_blocked_address_gets_429_there(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 2}")
    )
    token = await harness.token("alice")
    view, secret = await harness.directory.create_key("alice", actor="test")
    policy = '"auth";q=2;w=120'

    def form(key_secret: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_id": view.id, "client_secret": key_secret}

    # A right secret counts nothing (and carries no "auth" headers).
    for _ in range(3):
        reply = await send(harness, TOKEN, method="POST", data=form(secret))
        assert reply.status == 200 and reply.body["token_type"] == "Bearer", str(reply)
        assert_no_limits(reply)
    # A wrong secret (well-formed, so it is looked up) counts one, in RFC 6749's shape.
    reply = await send(harness, TOKEN, method="POST", data=form(tokens.generate(tokens.KEY_PREFIX)))
    assert (reply.status, reply.body["error"]) == (401, "invalid_client"), str(reply)
    assert_limits(reply, policy, [("auth", 1, 0)])
    # A bad bearer on the proxy counts towards the same address's counter.
    reply = await send(harness, "/echo/a", well_formed_guess())
    assert_limits(reply, policy, [("auth", 0, 60)])

    # Blocked: the right secret gets the gateway's 429, and so does a valid bearer token.
    reply = await send(harness, TOKEN, method="POST", data=form(secret))
    assert_rate_limited(reply)
    assert_limits(reply, policy, [("auth", 0, 60)])
    assert "access_token" not in reply.body
    assert_rate_limited(await send(harness, "/echo/a", token))
    assert metric(harness, 'gateway_token_exchanges_total{result="rate_limited"}') == 1.0


async def test_wrong_key_secrets_alone_block_the_address(make_harness: MakeHarness, rate_store: str) -> None:
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 2}")
    )
    token = await harness.token("alice")
    view, secret = await harness.directory.create_key("alice", actor="test")
    basic_wrong = {"client_id": view.id, "client_secret": "gwk_malformed"}
    for left in (1, 0):
        reply = await send(
            harness, TOKEN, method="POST", data={"grant_type": "client_credentials", **basic_wrong}
        )
        assert (reply.status, reply.body["error"]) == (401, "invalid_client"), str(reply)
        assert state_of(reply)[0][:2] == ("auth", left)
    assert_rate_limited(await send(harness, "/echo/a", token))
    data = {"grant_type": "client_credentials", "client_id": view.id, "client_secret": secret}
    assert_rate_limited(await send(harness, TOKEN, method="POST", data=data))


async def test_a_token_request_without_credentials_does_not_count(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness, rate_store, extra_yaml=limits(rate_store, auth_failures="{rate: 1, per: 1m, burst: 1}")
    )
    token = await harness.token("alice")
    for _ in range(3):
        reply = await send(harness, TOKEN, method="POST", data={"grant_type": "client_credentials"})
        assert (reply.status, reply.body["error"]) == (401, "invalid_client"), str(reply)
        assert_no_limits(reply)
    reply = await send(harness, "/echo/a", token)
    assert reply.status == 200, str(reply)


# -- 7. forward-auth ----------------------------------------------------------------------------


async def test_forward_auth_applies_the_limits_and_nginx_gets_403_with_the_real_status(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=PEERS
        + limits(
            rate_store,
            per_user="{rate: 1, per: 1m, burst: 2}",
            auth_failures="{rate: 1, per: 1m, burst: 1}",
        ),
    )
    alice = await harness.token("alice")
    bob = await harness.token("bob")
    before = upstream_seen(harness)
    nginx = {"X-Original-Method": "GET", "X-Original-URI": "/echo/a"}
    traefik = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/echo/a"}

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    reply = await send(harness, AUTHZ, headers={**traefik, **bearer(alice)})
    assert (reply.status, reply.body) == (200, None), str(reply)
    assert reply.headers["X-Service-User"] == "alice"
    assert_limits(reply, '"user";q=2;w=120', [("user", 1, 0)])
    reply = await send(harness, AUTHZ, headers={**nginx, **bearer(alice)})
    assert reply.status == 200, str(reply)
    assert_limits(reply, '"user";q=2;w=120', [("user", 0, 60)])

    # nginx turns every status but 401/403 into 500: a 429 goes as 403 + X-Gateway-Status.
    reply = await send(harness, AUTHZ, headers={**nginx, **bearer(alice)})
    assert (reply.status, reply.error) == (403, "rate_limited"), str(reply)
    assert reply.headers["X-Gateway-Status"] == "429"
    assert reply.headers["Cache-Control"] == "no-store"
    assert "X-Service-User" not in reply.headers
    assert_limits(
        Reply(429, reply.headers, reply.body), '"user";q=2;w=120', [("user", 0, 60)]
    )  # Retry-After and the RateLimit headers as on a 429
    # Traefik's pair and Envoy's path: the plain 429.
    reply = await send(harness, AUTHZ, headers={**traefik, **bearer(alice)})
    assert_rate_limited(reply)
    assert "X-Gateway-Status" not in reply.headers
    assert_limits(reply, '"user";q=2;w=120', [("user", 0, 60)])
    reply = await send(harness, AUTHZ + "/echo/a", headers=bearer(alice))
    assert_rate_limited(reply)

    # auth_failures through forward-auth: the 401 passes nginx as it is, then the address is blocked.
    reply = await send(harness, AUTHZ, headers={**nginx, **bearer(well_formed_guess())})
    assert (reply.status, reply.error) == (401, "invalid_token"), str(reply)
    assert "X-Gateway-Status" not in reply.headers
    assert_limits(reply, '"auth";q=1;w=60', [("auth", 0, 60)])
    reply = await send(harness, AUTHZ, headers={**nginx, **bearer(bob)})
    assert (reply.status, reply.error, reply.headers["X-Gateway-Status"]) == (403, "rate_limited", "429")
    assert_limits(Reply(429, reply.headers, reply.body), '"auth";q=1;w=60', [("auth", 0, 60)])
    assert upstream_seen(harness) == before  # forward-auth decides, never forwards


# -- 8. explain never counts ---------------------------------------------------------------------


async def test_explain_never_counts(make_harness: MakeHarness, rate_store: str) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(
            rate_store,
            per_user="{rate: 1, per: 1m, burst: 2}",
            auth_failures="{rate: 1, per: 1m, burst: 2}",
        ),
    )
    token = await harness.token("alice")
    await harness.directory.create_user("root", actor="test", admin=True)
    _, admin = await harness.directory.create_token("root", "adm", actor="test")
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(build_admin_app(harness.gateway.admin_context()), host="127.0.0.1")
    )
    await client.start_server()
    try:
        bodies: list[dict[str, str]] = [
            {"method": "GET", "url": "/echo/a", "token": token},
            {"method": "GET", "url": "/echo/a", "user": "alice"},
            {"method": "GET", "url": "/echo/a", "token": well_formed_guess()},
            {"method": "GET", "url": "/echo/a", "token": "gw_nonsense"},
        ]
        for _ in range(4):
            for body in bodies:
                async with client.post(
                    "/v1/authz/explain", json=body, headers={"Authorization": f"Bearer {admin}"}
                ) as response:
                    assert response.status == 200, await response.text()
                    assert "RateLimit" not in response.headers
    finally:
        await client.close()
    # The user still has the whole burst, the address every failure it may make.
    assert_limits(await send(harness, "/echo/a", token), '"user";q=2;w=120', [("user", 1, 0)])
    assert_limits(await send(harness, "/echo/a", token), '"user";q=2;w=120', [("user", 0, 60)])
    reply = await send(harness, "/echo/a", well_formed_guess())
    assert reply.status == 401, str(reply)
    assert_limits(reply, '"auth";q=2;w=120', [("auth", 1, 0)])


# -- 9. metrics -----------------------------------------------------------------------------------


async def test_429s_are_counted_by_route_and_labels_never_hold_the_user(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(
            rate_store,
            per_user="{rate: 1, per: 1m, burst: 1}",
            auth_failures="{rate: 1, per: 1m, burst: 1}",
        ),
    )
    user = "zq-distinctive-user"
    token = await harness.token(user)
    sample = 'gateway_rate_limited_total{route="echo"}'
    assert metric(harness, sample) == 0.0
    assert (await send(harness, "/echo/a", token)).status == 200
    for _ in range(3):
        assert_rate_limited(await send(harness, "/echo/a", token))
    assert metric(harness, sample) == 3.0
    assert metric(harness, 'gateway_rate_limited_total{route="strip"}') == 0.0
    # An address blocked by auth_failures counts on the route it asked for.
    assert (await send(harness, "/strip/x", "gw_nonsense")).status == 401
    reply = await send(harness, "/strip/x", token)
    assert_rate_limited(reply)
    assert_limits(reply, '"auth";q=1;w=60', [("auth", 0, 60)])
    assert metric(harness, 'gateway_rate_limited_total{route="strip"}') == 1.0
    assert metric(harness, sample) == 3.0
    assert metric(harness, 'gateway_refusals_total{reason="rate_limited"}') == 4.0
    assert metric(harness, "gateway_rate_limit_store_errors_total") == 0.0
    text = harness.gateway.metrics.render().decode()
    assert user not in text and token not in text and "127.0.0.1" not in text
    for line in text.splitlines():
        if line.startswith("gateway_rate_limited_total{"):
            assert re.fullmatch(r'gateway_rate_limited_total\{route="[a-z0-9._-]*"\} [0-9.e+]+', line), line


# -- 10. reloads ------------------------------------------------------------------------------------


async def test_a_reload_keeps_counters_and_removing_a_limit_lifts_it(
    make_harness: MakeHarness, rate_store: str
) -> None:
    harness = await start(
        make_harness,
        rate_store,
        extra_yaml=limits(rate_store),
        route_options="rate_limit: {rate: 1, per: 1m, burst: 1}",
    )
    token = await harness.token("alice")
    path = harness.gateway.config.path
    original = path.read_text()
    echo_limit = "    rate_limit: {rate: 1, per: 1m, burst: 1}\n"
    assert original.count(echo_limit) == 1 and original.count("    strip_prefix: true\n") == 1

    def rewrite(text: str) -> None:
        path.write_text(text)
        assert harness.gateway.reload(), "the reload was refused"

    assert_limits(await send(harness, "/echo/a", token), '"route";q=1;w=60', [("route", 0, 60)])
    assert_rate_limited(await send(harness, "/echo/a", token))

    # Another route's limit changes: this key's counter stays (still refused right after).
    text = original.replace(
        "    strip_prefix: true\n", "    strip_prefix: true\n    rate_limit: {rate: 5, per: 1m}\n"
    )
    rewrite(text)
    reply = await send(harness, "/echo/a", token)
    assert_rate_limited(reply)
    assert_limits(reply, '"route";q=1;w=60', [("route", 0, 60)])
    assert_limits(await send(harness, "/strip/x", token), '"route";q=5;w=60', [("route", 4, 0)])

    # This route's own limit changes: the new one applies at once, on the counter kept (a fresh
    # counter would admit two).
    text = text.replace(echo_limit, "    rate_limit: {rate: 1, per: 1m, burst: 2}\n")
    rewrite(text)
    assert_limits(await send(harness, "/echo/a", token), '"route";q=2;w=120', [("route", 0, 60)])
    reply = await send(harness, "/echo/a", token)
    assert_rate_limited(reply)
    assert_limits(reply, '"route";q=2;w=120', [("route", 0, 60)])

    # The limit removed: lifted at once, no headers.
    rewrite(text.replace("    rate_limit: {rate: 1, per: 1m, burst: 2}\n", ""))
    for _ in range(3):
        reply = await send(harness, "/echo/a", token)
        assert reply.status == 200, str(reply)
        assert_no_limits(reply)


# -- on_store_error: Redis that cannot be reached ----------------------------------------------------


@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_an_unreachable_redis_lets_on_store_error_decide_and_never_logs_its_password(
    make_harness: MakeHarness, on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = "Hunter2ZqSecret"
    harness = await make_harness(
        extra_yaml=f"rate_limits:\n  store: redis://gw:{password}@127.0.0.1:1/0\n"
        f"  on_store_error: {on_error}\n  per_user: {{rate: 1, per: 1m, burst: 1}}\n"
    )
    token = await harness.token("alice")
    for _ in range(3):
        reply = await send(harness, "/echo/a", token)
        if on_error == "allow":
            assert reply.status == 200, str(reply)
            assert_no_limits(reply)
        else:
            assert (reply.status, reply.error) == (503, "store_unavailable"), str(reply)
    assert metric(harness, "gateway_rate_limit_store_errors_total") == 3.0
    logged = [record for record in caplog.records if record.name == "gateway.limiter"]
    assert len(logged) == 1, logged  # once per outage
    assert password not in caplog.text
    assert getattr(logged[0], "store", "") == "redis://gw:***@127.0.0.1:1/0"


# -- 11. config errors ---------------------------------------------------------------------------------

ROUTE = "routes:\n  - name: orders\n    prefix: /orders\n    upstream: http://127.0.0.1:9000\n"
SECRET = "S3cretZqPass"
STORE_HINT = "must be memory, redis://[user:password@]host[:port][/db] or rediss://… (TLS)"
LIMIT_ERRORS = [
    # (gateway.yaml, line, message after "file:line: ")
    (
        f"rate_limits:\n  store: 'redis://gw:{SECRET}@:6379/0'\n",
        2,
        f"rate_limits.store: {STORE_HINT}; the host is missing",
    ),
    (f"rate_limits:\n  store: 'http://gw:{SECRET}@h/0'\n", 2, f"rate_limits.store: {STORE_HINT}"),
    (
        f"rate_limits:\n  store: 'redis://gw:{SECRET}@h:port/0'\n",
        2,
        f"rate_limits.store: {STORE_HINT}; the port is not a number",
    ),
    (
        f"rate_limits:\n  store: 'redis://gw:{SECRET}@h:0/0'\n",
        2,
        f"rate_limits.store: {STORE_HINT}; port 0 is not a port",
    ),
    (
        f"rate_limits:\n  store: 'rediss://gw:{SECRET}@h/db'\n",
        2,
        f"rate_limits.store: {STORE_HINT}; the database must be a number "
        "(percent-encode a '/' in the password)",
    ),
    (
        f"rate_limits:\n  store: 'redis://gw:{SECRET}@h/0?password={SECRET}'\n",
        2,
        f"rate_limits.store: {STORE_HINT}; no query or fragment",
    ),
    ("rate_limits:\n  store: 6379\n", 2, "rate_limits.store: must be a string, not a number"),
    ("rate_limits:\n  on_store_error: ignore\n", 2, "rate_limits.on_store_error: must be allow or deny"),
    (
        "rate_limits:\n  per_user: {rate: 0, per: 1s}\n",
        2,
        "rate_limits.per_user.rate: must be an integer from 1 to 1000000000 per period, not 0",
    ),
    (
        "rate_limits:\n  per_user:\n    rate: 5\n    per: 1x\n",
        4,
        "rate_limits.per_user.per: '1x' is not a period: write a number with s, m or h (1s, 30s, 1m, 1h)",
    ),
    (
        "rate_limits:\n  auth_failures:\n    rate: 5\n    per: 25h\n",
        4,
        "rate_limits.auth_failures.per: '25h' is longer than a day (24h)",
    ),
    (
        "rate_limits:\n  per_user:\n    rate: 5\n    per: 1s\n    burst: 0\n",
        5,
        "rate_limits.per_user.burst: must be an integer from 1 to 1000000000 at once, not 0",
    ),
    ("rate_limits:\n  per_user: {per: 1s}\n", 2, "rate_limits.per_user.rate: is required"),
    (
        "rate_limits:\n  per_user:\n    rate: 5\n    per: 1s\n    brust: 2\n",
        5,
        "rate_limits.per_user.brust: unknown key; did you mean 'burst'?",
    ),
    (
        "rate_limits:\n  store: memory\n  per_usr: {rate: 1, per: 1s}\n",
        3,
        "rate_limits.per_usr: unknown key; did you mean 'per_user'?",
    ),
    (
        "rate_limits:\n  store: memory\n  window: 1s\n",
        3,
        "rate_limits.window: unknown key; expected one of: store, on_store_error, per_user, auth_failures",
    ),
    ("rate_limits: 100/1s\n", 1, "rate_limits: must be a mapping, not a string"),
    ("rate_limits:\n  per_user: 100\n", 2, "rate_limits.per_user: must be a mapping, not a number"),
    (
        "rate_limits:\n  auth_failures: [20, 1m]\n",
        2,
        "rate_limits.auth_failures: must be a mapping, not a list",
    ),
    (
        ROUTE + "    rate_limit: {rate: 0, per: 1s}\n",
        5,
        "routes[0].rate_limit.rate: must be an integer from 1 to 1000000000 per period, not 0",
    ),
    (
        ROUTE + "    rate_limit:\n      rate: 10\n      per: 1x\n",
        7,
        "routes[0].rate_limit.per: '1x' is not a period: write a number with s, m or h (1s, 30s, 1m, 1h)",
    ),
    (
        ROUTE + "    rate_limit:\n      rate: 10\n      per: 25h\n",
        7,
        "routes[0].rate_limit.per: '25h' is longer than a day (24h)",
    ),
    (
        ROUTE + "    rate_limit:\n      rate: 10\n      per: 1s\n      burst: 0\n",
        8,
        "routes[0].rate_limit.burst: must be an integer from 1 to 1000000000 at once, not 0",
    ),
    (
        ROUTE + "    rate_limit:\n      rate: 10\n      per: 1s\n      window: 2\n",
        8,
        "routes[0].rate_limit.window: unknown key; expected one of: rate, per, burst",
    ),
    (ROUTE + "    rate_limit: 10/1s\n", 5, "routes[0].rate_limit: must be a mapping, not a string"),
]


def config_problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return info.value.problems


@pytest.mark.parametrize(("text", "line", "message"), LIMIT_ERRORS)
def test_each_bad_rate_limit_value_is_a_file_line_problem(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    problems = config_problems(tmp_path, text)
    assert problems == [f"{tmp_path / 'gateway.yaml'}:{line}: {message}"]
    assert SECRET not in "\n".join(problems)


async def test_the_store_url_may_come_from_the_environment_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("rate_limits:\n  store: memory\n")
    url = f"redis://gw:{SECRET}@127.0.0.1:6379/9"
    config = load_config(path, env={"GATEWAY_RATE_LIMIT_STORE_URL": url})
    assert config.rate_limits.store == url
    limiter = RateLimiter(config.rate_limits, Metrics())
    assert isinstance(limiter.store, RedisStore)
    await limiter.close()
    assert load_config(path, env={"GATEWAY_RATE_LIMIT_STORE_URL": ""}).rate_limits.store == "memory"
    assert load_config(path, env={}).rate_limits == RateLimitConfig()
    problems = config_problems(
        tmp_path, path.read_text(), {"GATEWAY_RATE_LIMIT_STORE_URL": f"redis://gw:{SECRET}@/x"}
    )
    assert problems == [f"GATEWAY_RATE_LIMIT_STORE_URL: {STORE_HINT}; the host is missing"]
    problems = config_problems(
        tmp_path, path.read_text(), {"GATEWAY_RATE_LIMIT_STORE_URL": f"http://gw:{SECRET}@h:6379/0"}
    )
    assert problems == [f"GATEWAY_RATE_LIMIT_STORE_URL: {STORE_HINT}"]


def test_a_password_with_a_slash_never_appears_in_the_problem(tmp_path: Path) -> None:
    problems = config_problems(tmp_path, "rate_limits:\n  store: 'redis://gw:2024/Zq!Secret@redis:6379/0'\n")
    assert "Zq!Secret" not in "\n".join(problems)


def test_every_bad_field_of_one_limit_is_reported(tmp_path: Path) -> None:
    problems = config_problems(
        tmp_path, "rate_limits:\n  per_user:\n    rate: 0\n    per: 1x\n    burst: 0\n"
    )
    assert [problem.split(": ", 2)[1] for problem in problems] == [
        "rate_limits.per_user.rate",
        "rate_limits.per_user.per",
        "rate_limits.per_user.burst",
    ]


# -- 13. the memory store and the Redis script agree ------------------------------------------------


def summary(verdicts: list[Verdict]) -> list[tuple[bool, int, int]]:
    return [(v.allowed, v.remaining, math.ceil(v.retry_after)) for v in verdicts]


async def test_the_memory_store_and_the_redis_script_give_the_same_verdicts(redis_url: str) -> None:
    user = make_limit(3, "1m", 3)  # one every 20 s
    route = make_limit(1, "1m", 1)  # one every 60 s
    sequence: list[tuple[tuple[Check, ...], bool]] = [
        ((Check("user", "u:look", user),), False),  # look only, twice: nothing consumed
        ((Check("user", "u:look", user),), False),
        *[((Check("user", "u:a", user),), True)] * 5,  # the burst, then refusals
        # Two keys at once: the route refuses its second, which consumes from neither.
        *[((Check("user", "u:b", user), Check("route", "r:echo:b", route)), True)] * 3,
        ((Check("user", "u:b", user),), True),
        ((Check("user", "u:b", user),), True),
        ((Check("user", "u:b", user),), True),
    ]
    memory = MemoryStore()
    redis = RedisStore(redis_url, timeout=2.0)
    try:
        from_memory = [summary(await memory.apply(checks, consume)) for checks, consume in sequence]
        from_redis = [summary(await redis.apply(checks, consume)) for checks, consume in sequence]
    finally:
        await redis.close()
    assert from_memory == from_redis
    assert from_memory == [
        [(True, 2, 0)],
        [(True, 2, 0)],
        [(True, 2, 0)],
        [(True, 1, 0)],
        [(True, 0, 20)],
        [(False, 0, 20)],
        [(False, 0, 20)],
        [(True, 2, 0), (True, 0, 60)],
        [(True, 1, 0), (False, 0, 60)],
        [(True, 1, 0), (False, 0, 60)],
        [(True, 1, 0)],
        [(True, 0, 20)],
        [(False, 0, 20)],
    ]


async def test_concurrent_requests_never_get_more_than_the_burst(rate_store: str) -> None:
    store = MemoryStore() if rate_store == "memory" else RedisStore(rate_store, timeout=5.0)
    limit = make_limit(1, "1h", 5)
    try:
        results = await asyncio.gather(
            *(
                store.apply((Check("user", "u:many", limit), Check("route", "r:x:many", limit)), True)
                for _ in range(40)
            )
        )
    finally:
        await store.close()
    admitted = sorted(v[0].remaining for v in results if all(item.allowed for item in v))
    assert admitted == [0, 1, 2, 3, 4]


async def test_redis_keys_expire_once_they_would_be_idle(redis_url: str) -> None:
    import redis.asyncio as redis_client

    store = RedisStore(redis_url, timeout=2.0)
    client = redis_client.Redis.from_url(redis_url)
    try:
        await store.apply((Check("user", "u:ttl", make_limit(1, "1m", 2)),), True)
        ttl = await client.pttl("gateway:rl:u:ttl")
        assert 55_000 < ttl <= 60_001  # until its TAT (one 60 s interval ahead), then gone
        await store.apply((Check("user", "u:look", make_limit(1, "1m", 2)),), False)
        assert await client.exists("gateway:rl:u:look") == 0  # looking writes nothing
    finally:
        await store.close()
        await client.aclose()
