"""gateway.metrics.RequestTally: counts kept as ints on the request path and flushed into the
Prometheus objects give the same scrape as observing each request directly."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.metrics import SECONDS_BUCKETS, RequestTally

SECONDS = [0.0004, 0.001, 0.0011, 0.003, 0.2, 0.2, 7.0, 29.9, 30.0, 31.0, 120.0]


def family(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def objects(registry: CollectorRegistry) -> tuple[Counter, Histogram, Histogram]:
    return (
        Counter("requests", "r", ["route", "status"], registry=registry),
        Histogram("durations", "d", ["route"], buckets=SECONDS_BUCKETS, registry=registry),
        Histogram("upstream", "u", ["route"], buckets=SECONDS_BUCKETS, registry=registry),
    )


def test_flushed_tallies_scrape_as_direct_observations_do_across_two_flushes() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    requests, durations, upstream = objects(direct)
    flushed = objects(tallied)
    tally = RequestTally(SECONDS_BUCKETS)
    for round_ in range(2):
        for index, seconds in enumerate(SECONDS):
            route = "a" if index % 3 else "b"
            status = "200" if index % 2 else "404"
            requests.labels(route, status).inc()
            tally.count(route, status)
            durations.labels(route).observe(seconds)
            tally.observe(tally.durations, route, seconds)
            if round_ == 0:
                upstream.labels(route).observe(seconds / 2)
                tally.observe(tally.upstream, route, seconds / 2)
        tally.flush(*flushed)
        assert family(tallied) == family(direct)
    tally.flush(*flushed)  # nothing new: nothing added
    assert family(tallied) == family(direct)
