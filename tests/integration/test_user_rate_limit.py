"""A user's rate-limit override reaches a running gateway through the change feed (README "Freshness").

The change is made by another process in effect (`harness.directory` does not call the
gateway's own `changed`), so only the change row can evict the cached identity.
"""

from __future__ import annotations

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
