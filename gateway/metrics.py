"""Prometheus metrics of one gateway process, served on the admin listener at /metrics.

Imports: prometheus-client only.

Labels are bounded sets (route names from the config, status codes, the closed set of
refusal codes); never a user, token, path or query.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters and histograms one process exposes (own registry: no globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        # Counted by the authenticator as plain ints (cheap on the hot path), copied here per scrape.
        self.cache_hits = Gauge(
            "gateway_token_cache_hits_total", "Token lookups answered from the cache.", registry=self.registry
        )
        self.cache_misses = Gauge(
            "gateway_token_cache_misses_total",
            "Token lookups that went to the store.",
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_response_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
