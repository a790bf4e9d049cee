"""RateLimiter.guard: failed credential checks per address under concurrency and store outages."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import RateLimitConfig
from gateway.errors import Refusal, StoreUnavailable, Unauthenticated
from gateway.limiter import RateLimiter
from gateway.metrics import Metrics
from gateway.ratelimit import Limit, limit_problems
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
