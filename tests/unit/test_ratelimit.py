"""The GCRA decision of gateway.ratelimit, on a simulated clock (no store, no sleeping)."""

from __future__ import annotations

import pytest

from gateway.ratelimit import Limit, decide, limit_item, policy_item, retry_after_header


def run(limit: Limit, times: list[float]) -> list[bool]:
    return run_from(limit, None, times)


def test_a_burst_is_admitted_whole_then_refused_with_the_time_to_wait() -> None:
    limit = Limit(rate=10, per=1.0, burst=5)
    tat = None
    for left in (4, 3, 2, 1, 0):
        verdict = decide(limit, tat, 100.0)
        assert verdict.allowed and verdict.remaining == left
        tat = verdict.tat
    refused = decide(limit, tat, 100.0)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after == pytest.approx(0.1)
    assert refused.tat == tat  # a refused request consumes nothing
    assert decide(limit, tat, 100.1).allowed


def test_the_steady_rate_is_the_configured_one() -> None:
    limit = Limit(rate=50, per=1.0, burst=10)
    # A client sending 200 requests a second for 10 s gets the burst plus 50 a second.
    times = [i / 200 for i in range(2000)]
    admitted = sum(run(limit, times))
    assert 10 + 50 * 10 - 2 <= admitted <= 10 + 50 * 10 + 2


def test_an_idle_key_earns_its_burst_back_and_no_more() -> None:
    limit = Limit(rate=1, per=1.0, burst=3)
    assert run(limit, [0, 0, 0, 0]) == [True, True, True, False]
    # After 10 s idle, still only the burst.
    tat = None
    for now in (0, 0, 0):
        tat = decide(limit, tat, now).tat
    assert run_from(limit, tat, [10, 10, 10, 10]) == [True, True, True, False]


def run_from(limit: Limit, tat: float | None, times: list[float]) -> list[bool]:
    """Whether each request at `times` is admitted, starting from the key's stored `tat`."""
    admitted = []
    for now in times:
        verdict = decide(limit, tat, now)
        admitted.append(verdict.allowed)
        tat = verdict.tat
    return admitted


def test_headers_follow_the_draft_syntax() -> None:
    limit = Limit(rate=100, per=1.0, burst=200)
    assert policy_item("user", limit) == '"user";q=200;w=2'
    verdict = decide(limit, None, 0.0)
    assert limit_item("user", verdict) == '"user";r=199;t=0'
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"


def test_a_key_counted_under_a_stricter_limit_starts_from_an_empty_bucket() -> None:
    strict, loose = Limit(rate=2, per=3600.0, burst=2), Limit(rate=10, per=1.0, burst=5)
    tat = None
    for _ in range(2):
        tat = decide(strict, tat, 100.0).tat
    assert tat is not None and tat > 100.0 + 3000  # an hour of debt under the strict limit
    refused = decide(loose, tat, 100.0)
    # Under the loose limit that is an empty bucket (0.5 s of debt at most), not an hour:
    assert not refused.allowed and refused.retry_after == pytest.approx(0.1)
    assert refused.tat == pytest.approx(100.5)
    assert decide(loose, refused.tat, 100.1).allowed
