"""Prometheus metrics of one gateway process, served on the admin listener at /metrics.

Imports: prometheus-client; the package's version.

Labels are bounded sets (route names from the config, status codes, the closed set of
refusal codes); never a user, token, path or query.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
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


class Metrics:
    """The counters and histograms one process exposes (own registry: no globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes…
        about = "The running gateway's version (always 1)."
        info = Gauge("gateway_build_info", about, ["version"], registry=self.registry)
        info.labels(__version__).set(1)
        self.in_flight = InFlight()
        self.registry.register(self.in_flight)
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
        self.registry.register(self.token_cache)
        self.upstream_latency = Histogram(
            "gateway_upstream_response_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.store_healthy = Gauge(
            "gateway_store_healthy",
            "1 while the change feed reads the store, else 0.",
            registry=self.registry,
        )
        self.cached_identities = Gauge(
            "gateway_cached_identities", "Identities currently in the token cache.", registry=self.registry
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
        self.websockets_open = Gauge(
            "gateway_websockets_open",
            "WebSockets being relayed, by route.",
            ["route"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
