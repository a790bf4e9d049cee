"""RateLimiter: failed credential checks per address (concurrency, outages) and the memory fast path."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from gateway.config import RateLimitConfig
from gateway.errors import RateLimited, Refusal, StoreUnavailable, Unauthenticated
from gateway.limiter import Check, MemoryStore, RateLimiter
from gateway.metrics import Metrics
from gateway.ratelimit import Limit, limit_problems
from gateway.store import Principal
from tests.process import free_port

FAILURES = Limit(rate=1, per=60.0, burst=5)


async def guesses(limiter: RateLimiter, config: RateLimitConfig, count: int) -> tuple[int, list[int]]:
    """`count` wrong credentials at once from one address, each checked for 20 ms (a store lookup):
    (how many reached the check, the statuses)."""
    reached = 0

    async def wrong() -> None:
        nonlocal reached
        reached += 1
        await asyncio.sleep(0.02)
        raise Unauthenticated(Refusal.INVALID_TOKEN, "unknown token")

    async def one(guess: int) -> int:
        try:
            await limiter.guard(config, "203.0.113.9", f"Bearer gw_guess{guess}", wrong)
        except Unauthenticated:
            return 401
        except StoreUnavailable:
            return 503
        except Exception as error:  # noqa: BLE001 -- the status is what the test compares
            return getattr(error, "status", 500)
        return 200

    statuses = await asyncio.gather(*(one(guess) for guess in range(count)))
    return reached, sorted(statuses)


async def test_guesses_in_flight_at_once_count_against_the_address() -> None:
    config = RateLimitConfig(auth_failures=FAILURES)
    limiter = RateLimiter(config, Metrics())
    reached, statuses = await guesses(limiter, config, 200)
    # Only the burst may be checked at all: the others are refused before their credential.
    assert reached == FAILURES.burst
    assert statuses == [401] * FAILURES.burst + [429] * (200 - FAILURES.burst)
    reached, statuses = await guesses(limiter, config, 10)
    assert reached == 0 and statuses == [429] * 10  # and the address stays blocked


async def test_a_missing_credential_counts_nothing() -> None:
    config = RateLimitConfig(auth_failures=FAILURES)
    limiter = RateLimiter(config, Metrics())

    async def none() -> None:
        raise Unauthenticated(Refusal.MISSING_TOKEN, "no Authorization header")

    for _ in range(3 * FAILURES.burst):
        with pytest.raises(Unauthenticated):
            await limiter.guard(config, "203.0.113.9", "", none)


@pytest.mark.parametrize("on_store_error", ["allow", "deny"])
async def test_failures_are_still_counted_while_redis_is_down(on_store_error: str) -> None:
    # Neither unlimited guessing (allow) nor every request refused (deny): counted in memory.
    config = RateLimitConfig(
        store=f"redis://127.0.0.1:{free_port()}/0", on_store_error=on_store_error, auth_failures=FAILURES
    )
    limiter = RateLimiter(config, Metrics())
    try:
        reached, statuses = await guesses(limiter, config, 20)
        assert reached == FAILURES.burst
        assert statuses == [401] * FAILURES.burst + [429] * (20 - FAILURES.burst)
    finally:
        await limiter.close()


async def test_one_credential_in_flight_many_times_counts_once() -> None:
    # A client's usual concurrency: 50 requests at once with one (cold) credential.
    config = RateLimitConfig(auth_failures=FAILURES)
    limiter = RateLimiter(config, Metrics())

    async def lookup() -> str:
        await asyncio.sleep(0.02)
        return "principal"

    found = await asyncio.gather(
        *(limiter.guard(config, "203.0.113.9", "Bearer gw_same", lookup) for _ in range(50))
    )
    assert found == ["principal"] * 50


def test_a_rate_the_stores_cannot_count_is_refused() -> None:
    assert limit_problems(1_000_000, "1s") == []
    assert limit_problems(3_000_000, "1s") == [("rate", "3000000 per 1s is more than a million a second")]
    assert limit_problems(1, "0.0000001s")[0][0] == "rate"


def test_the_memory_fast_path_decides_exactly_as_apply_now() -> None:
    # consume() repeats decide's admission arithmetic without Verdicts: same counts, same TATs,
    # and nothing changed when a check refuses, over bursts, refills, refusals and clamps.
    rng = random.Random(16)
    limits = [
        Limit(rate=3, per=60.0, burst=3),
        Limit(rate=1, per=60.0, burst=1),
        Limit(rate=100, per=1.0, burst=7),
    ]
    fast, slow = MemoryStore(), MemoryStore()
    now = 1000.0
    refused = 0
    for _ in range(3000):
        now += rng.choice((0.0, 0.0, 0.001, 0.3, 7.0, 25.0))
        names = rng.sample(["u:a", "u:b", "r:x:a"], rng.randint(1, 2))
        # A stricter limit's debt now and then: the next check clamps it to an empty bucket.
        checks = tuple(Check("user", name, rng.choice(limits)) for name in names)
        steps = tuple((check.key, check.limit.interval, check.limit.tolerance) for check in checks)
        counts = fast.consume(steps, now)
        verdicts = slow.apply_now(checks, True, now)
        if counts is None:
            refused += 1
            assert not all(verdict.allowed for verdict in verdicts)
            assert fast.apply_now(checks, True, now) == verdicts  # what admit_now does then
        else:
            expected = [number for v in verdicts for number in (v.remaining, math.ceil(v.retry_after))]
            assert all(verdict.allowed for verdict in verdicts) and list(counts) == expected
        assert fast._tats == slow._tats
    assert 300 < refused < 2700  # both paths were exercised


def principal(rate_limit: Limit | None = None, user: str = "ann") -> Principal:
    return Principal(user, "service", False, "t1", "token", None, (), None, frozenset(), rate_limit)


async def test_the_built_checks_follow_a_reload_and_the_users_own_limit() -> None:
    # admit keeps each (user, route)'s checks and policy header built: a new limit rebuilds them.
    route = Limit(rate=10, per=1.0, burst=20)
    config = RateLimitConfig(per_user=Limit(rate=100, per=1.0, burst=200))
    limiter = RateLimiter(config, Metrics())
    assert await limiter.admit(config, principal(), "orders", route) == (
        ("RateLimit-Policy", '"user";q=200;w=2, "route";q=20;w=2'),
        ("RateLimit", '"user";r=199;t=0, "route";r=19;t=0'),
    )
    # Equal limits from a new config (a reload that changed something else): same headers.
    same = RateLimitConfig(per_user=Limit(rate=100, per=1.0, burst=200))
    assert limiter.admit_now(same, principal(), "orders", Limit(rate=10, per=1.0, burst=20)) == (
        ("RateLimit-Policy", '"user";q=200;w=2, "route";q=20;w=2'),
        ("RateLimit", '"user";r=198;t=0, "route";r=18;t=0'),
    )
    reloaded = RateLimitConfig(per_user=Limit(rate=5, per=1.0, burst=5))
    limiter.reconfigure(reloaded)
    policy, _ = limiter.admit_now(reloaded, principal(), "orders", route) or ()
    assert policy == ("RateLimit-Policy", '"user";q=5;w=1, "route";q=20;w=2')
    policy, _ = limiter.admit_now(RateLimitConfig(), principal(), "orders", route) or ()
    assert policy == ("RateLimit-Policy", '"route";q=20;w=2')
    assert limiter.admit_now(RateLimitConfig(), principal(), "orders", None) == ()
    # The user's own limit replaces per_user; its key is shared across routes, the route's is not.
    own = Limit(rate=1, per=60.0, burst=2)
    assert limiter.admit_now(reloaded, principal(own, "bob"), "orders", route) == (
        ("RateLimit-Policy", '"user";q=2;w=120, "route";q=20;w=2'),
        ("RateLimit", '"user";r=1;t=0, "route";r=19;t=0'),
    )
    assert limiter.admit_now(reloaded, principal(own, "bob"), "billing", None) == (
        ("RateLimit-Policy", '"user";q=2;w=120'),
        ("RateLimit", '"user";r=0;t=60'),
    )
    with pytest.raises(RateLimited) as refused:
        limiter.admit_now(reloaded, principal(own, "bob"), "orders", route)
    assert refused.value.extra_headers == (
        ("RateLimit-Policy", '"user";q=2;w=120, "route";q=20;w=2'),
        ("RateLimit", '"user";r=0;t=60, "route";r=19;t=0'),
        ("Retry-After", "60"),
    )


async def test_only_the_memory_store_is_decided_without_a_coroutine() -> None:
    config = RateLimitConfig(store=f"redis://127.0.0.1:{free_port()}/0", per_user=FAILURES)
    limiter = RateLimiter(config, Metrics())
    try:
        assert limiter.admit_now(config, principal(), "orders", None) is None
        assert await limiter.admit(config, principal(), "orders", None) == ()  # on_store_error: allow
    finally:
        await limiter.close()
