"""A user's rate-limit override reaches a running gateway through the change feed (README "Freshness").

The change is made by another process in effect (`harness.directory` does not call the
gateway's own `changed`), so only the change row can evict the cached identity.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.ratelimit import Limit, parse_spec
from tests.conftest import Harness


async def test_another_process_changing_the_limit_evicts_the_cached_identity(harness: Harness) -> None:
    token = await harness.token("svc")
    await harness.settle()  # apply the feed entries of creating the user and token
    authenticator = harness.gateway.authenticator
    assert (await authenticator.authenticate_token(token)).rate_limit is None
    hits = authenticator.cache_hits
    assert (await authenticator.authenticate_token(token)).rate_limit is None
    assert authenticator.cache_hits == hits + 1  # cached: without eviction it would stay the default

    await harness.directory.update_user("svc", actor="test", rate_limit=parse_spec("100/1s:200"))
    await harness.settle()
    assert (await authenticator.authenticate_token(token)).rate_limit == Limit(rate=100.0, per=1.0, burst=200)

    await harness.directory.update_user("svc", actor="test", rate_limit=None)
    await harness.settle()
    assert (await authenticator.authenticate_token(token)).rate_limit is None


async def test_the_users_own_limit_replaces_per_user_at_the_proxy(make_harness: Any) -> None:
    harness: Harness = await make_harness(extra_yaml="rate_limits:\n  per_user: {rate: 1000, per: 1s}\n")
    token = await harness.token("svc")
    other = await harness.token("other")
    await harness.settle()

    async def statuses(secret: str, count: int) -> list[int]:
        found = []
        for _ in range(count):
            async with harness.client.get("/echo/a", headers={"Authorization": f"Bearer {secret}"}) as answer:
                found.append(answer.status)
                policy = answer.headers.get("RateLimit-Policy")
        found.append(0 if policy is None else int(policy.split("q=")[1].split(";")[0]))
        return found

    assert await statuses(token, 3) == [200, 200, 200, 1000]
    await harness.directory.update_user("svc", actor="test", rate_limit=parse_spec("2/1h:2"))
    await harness.settle()
    # The counter is kept in time (3 ms of debt at 1000/s): under 2 an hour that is the whole burst.
    assert await statuses(token, 3) == [200, 200, 429, 2]
    assert await statuses(other, 3) == [200, 200, 200, 1000]  # the others keep the default
    await harness.directory.update_user("svc", actor="test", rate_limit=None)
    await harness.settle()
    # The default again, from an empty bucket (not an hour of the strict limit's debt): it refills
    # at 1000 a second.
    assert await statuses(token, 1) == [429, 1000]
    await asyncio.sleep(0.05)
    assert await statuses(token, 2) == [200, 200, 1000]
