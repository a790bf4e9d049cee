"""Prometheus metrics of the gateway, served on the admin listener at /metrics.

Imports: prometheus-client; the package's version.

Labels are bounded sets (route names from the config, status codes, the closed set of
refusal codes); never a user, token, path or query.

One process keeps its values in memory. Under `--workers N` every worker writes them to
files in a directory the parent owns (prometheus-client's multiprocess mode) and worker 0's
scrape sums them: one answer for the whole gateway. Values the request path keeps as plain
ints (in flight, cache hits) and the process metrics are copied into those files by
`refresh`, every second and at each scrape.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gateway import __version__

CONTENT_TYPE = CONTENT_TYPE_LATEST


class TokenCacheCounters(Collector):
    """Token cache hits and misses, exposed as counters.

    The authenticator counts them as plain ints (a prometheus Counter would take a lock on
    every request); the scrape hands the totals over with `update` just before rendering.
    """

    def __init__(self) -> None:
        self._hits = 0
        self._misses = 0

    def update(self, hits: int, misses: int) -> None:
        """The authenticator's totals since the process started."""
        self._hits, self._misses = hits, misses

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Both counters (samples `gateway_token_cache_hits_total` and `..._misses_total`)."""
        yield CounterMetricFamily(
            "gateway_token_cache_hits", "Token lookups answered from the cache.", value=self._hits
        )
        yield CounterMetricFamily(
            "gateway_token_cache_misses", "Token lookups that went to the store.", value=self._misses
        )


# From a cache-hit request on loopback (1 ms) to the longest route timeout people set (30 s).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class InFlight(Collector):
    """Requests being handled now: a plain int the pipeline moves (no lock per request), read
    at the scrape."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """`gateway_requests_in_flight`."""
        yield GaugeMetricFamily(
            "gateway_requests_in_flight", "Proxy-listener requests being handled now.", value=self.count
        )


class RequestTally:
    """Per-request counts kept as plain ints and handed to the Prometheus objects by `flush`.

    A proxied request used to take three locks (a counter and two histograms), and under
    `--workers` each of those wrote the shared files; it now adds to a dict and a list, and
    the totals move over every second and at each scrape (`Metrics.refresh`).
    """

    __slots__ = ("_bounds", "requests", "durations", "upstream")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.requests: dict[tuple[str, str], int] = {}
        # Per route: the count in each bucket (not cumulative; the last is +Inf) and the sum.
        self.durations: dict[str, tuple[list[int], list[float]]] = {}
        self.upstream: dict[str, tuple[list[int], list[float]]] = {}

    def count(self, route: str, status: str) -> None:
        """One request of `route` answered with `status`."""
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, into: dict[str, tuple[list[int], list[float]]], route: str, seconds: float) -> None:
        """One observation of `seconds` for `route` in `into` (durations or upstream)."""
        found = into.get(route)
        if found is None:
            found = into[route] = ([0] * (len(self._bounds) + 1), [0.0])
        found[0][bisect_left(self._bounds, seconds)] += 1
        found[1][0] += seconds

    def flush(self, requests: Counter, durations: Histogram, upstream: Histogram) -> None:
        """Add what was counted since the last flush to the Prometheus objects, and start over."""
        counted, self.requests = self.requests, {}
        for (route, status), number in counted.items():
            requests.labels(route, status).inc(number)
        for tally, histogram in ((self.durations, durations), (self.upstream, upstream)):
            for route, (buckets, total) in tally.items():
                if total[0] == 0.0 and not any(buckets):
                    continue
                _add_observations(histogram.labels(route), buckets, total[0])
                buckets[:] = [0] * len(buckets)
                total[0] = 0.0


def _add_observations(child: Histogram, buckets: list[int], total: float) -> None:
    # prometheus-client has no call that adds many observations at once; its histogram child
    # keeps one value per bucket (non-cumulative, +Inf last) and one for the sum, each with
    # inc(), in memory or in the shared files alike (tests/unit/test_request_tally.py checks
    # the scrape against direct observations).
    for value, number in zip(child._buckets, buckets, strict=True):
        if number:
            value.inc(number)
    child._sum.inc(total)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the scrape reads from the running gateway rather than from the request path."""

    store_healthy: bool
    cached_identities: int
    cache_hits: int
    cache_misses: int


def share_between_workers(directory: str) -> None:
    """Make every metric created from now on in this process write its values to `directory`.

    Called in a worker right after the fork, before its Metrics exist; the parent owns the
    directory (creates it empty, removes it on exit).
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def worker_gone(directory: str, pid: int) -> None:
    """Forget a dead worker's gauges (its counters and histograms stay in the sums)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class Metrics:
    """The counters and histograms of the gateway (own registry: no globals).

    `shared_dir` is the multiprocess directory of `--workers N` (share_between_workers was
    called); None for one process.
    """

    def __init__(self, shared_dir: str | None = None) -> None:
        self.shared = shared_dir is not None
        self.registry = CollectorRegistry(auto_describe=True)
        # Gauges say how workers combine: summed over the live ones, or their minimum.
        info = Gauge(
            "gateway_build_info",
            "The running gateway's version (always 1).",
            ["version"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        info.labels(__version__).set(1)
        self.in_flight = InFlight()
        self.tally = RequestTally(SECONDS_BUCKETS)
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole proxied requests, from the request's head to the answer's last byte (not WebSockets).",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "gateway_requests",
            "Proxied requests by route and response status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "gateway_refusals",
            "Requests the gateway refused, by refusal code.",
            ["reason"],
            registry=self.registry,
        )
        self.token_cache = TokenCacheCounters()
        self.upstream_latency = Histogram(
            "gateway_upstream_response_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.store_healthy = Gauge(
            "gateway_store_healthy",
            "1 while the change feed reads the store, else 0 (every worker's, under --workers).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.cached_identities = Gauge(
            "gateway_cached_identities",
            "Identities currently in the token cache.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.token_exchanges = Counter(
            "gateway_token_exchanges",
            "Exchanges at POST /.gateway/token, by result (issued or the RFC error code).",
            ["result"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "gateway_rate_limited",
            "Requests refused by a rate limit (429), by route.",
            ["route"],
            registry=self.registry,
        )
        self.rate_limit_store_errors = Counter(
            "gateway_rate_limit_store_errors",
            "Requests whose rate limits could not be checked because the store failed or was down.",
            registry=self.registry,
        )
        self.retention_deleted = Counter(
            "gateway_retention_deleted_rows",
            "Rows retention removed from the store, by table (changes, audit_events).",
            ["table"],
            registry=self.registry,
        )
        self.websockets_open = Gauge(
            "gateway_websockets_open",
            "WebSockets being relayed, by route.",
            ["route"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        if shared_dir is None:
            ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, …_resident_memory_bytes
            self.registry.register(self.in_flight)
            self.registry.register(self.token_cache)
            self._shared: SharedCopies | None = None
            self._scrape = self.registry
        else:
            self._shared = SharedCopies(self.registry)
            self._scrape = CollectorRegistry(auto_describe=True)
            MultiProcessCollector(self._scrape, path=shared_dir)  # type: ignore[no-untyped-call]

    def refresh(self, now: Snapshot) -> None:
        """Bring the values read at scrape time up to date (under --workers: into the shared files)."""
        self.tally.flush(self.requests, self.request_duration, self.upstream_latency)
        self.store_healthy.set(1 if now.store_healthy else 0)
        self.cached_identities.set(now.cached_identities)
        self.token_cache.update(now.cache_hits, now.cache_misses)
        if self._shared is not None:
            self._shared.copy(self.in_flight.count, now.cache_hits, now.cache_misses)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (of every worker, under --workers)."""
        return generate_latest(self._scrape)


# The process metrics, copied into counters and gauges that the shared files can hold, and
# how workers combine: CPU time and memory add up, the oldest start time stands for the gateway.
_Mode = Literal["livesum", "livemin"]
_PROCESS_GAUGES: dict[str, tuple[_Mode, str]] = {
    "process_virtual_memory_bytes": ("livesum", "Virtual memory size in bytes (all workers)."),
    "process_resident_memory_bytes": ("livesum", "Resident memory size in bytes (all workers)."),
    "process_open_fds": ("livesum", "Number of open file descriptors (all workers)."),
    "process_max_fds": ("livemin", "Maximum number of open file descriptors (per worker)."),
    "process_start_time_seconds": ("livemin", "Start time of the oldest worker since unix epoch in seconds."),
}


class SharedCopies:
    """Under --workers: the values the request path keeps as plain ints, and the process
    metrics, written to this worker's files on each `copy`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._in_flight = Gauge(
            "gateway_requests_in_flight",
            "Proxy-listener requests being handled now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._hits = Counter(
            "gateway_token_cache_hits", "Token lookups answered from the cache.", registry=registry
        )
        self._misses = Counter(
            "gateway_token_cache_misses", "Token lookups that went to the store.", registry=registry
        )
        self._counted = (0, 0)
        self._process = ProcessCollector(registry=None)
        self._cpu = Counter(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds (all workers).",
            registry=registry,
        )
        self._cpu_counted = 0.0
        self._gauges = {
            name: Gauge(name, about, registry=registry, multiprocess_mode=mode)
            for name, (mode, about) in _PROCESS_GAUGES.items()
        }

    def copy(self, in_flight: int, hits: int, misses: int) -> None:
        """Write this worker's current values."""
        self._in_flight.set(in_flight)
        counted_hits, counted_misses = self._counted
        self._hits.inc(hits - counted_hits)
        self._misses.inc(misses - counted_misses)
        self._counted = (hits, misses)
        for family in self._process.collect():
            for found in family.samples:
                if found.name == "process_cpu_seconds_total":
                    self._cpu.inc(max(0.0, found.value - self._cpu_counted))
                    self._cpu_counted = max(self._cpu_counted, found.value)
                elif found.name in self._gauges:
                    self._gauges[found.name].set(found.value)
