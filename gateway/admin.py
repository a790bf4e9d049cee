"""The admin listener's application: health, readiness, metrics and the admin REST API.

Imports: errors, auth, changefeed, metrics, pipeline (Settings), services, store, aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.auth import Authenticator, TokenCache
from gateway.changefeed import ChangeFeed
from gateway.errors import StoreUnavailable
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.pipeline import Settings
from gateway.services import Directory
from gateway.store import Store


@dataclass(frozen=True, slots=True)
class AdminContext:
    """What the admin listener needs from the running gateway (built in app.py)."""

    store: Store
    directory: Directory
    authenticator: Authenticator  # admin tokens are checked like any token, then kind == "admin"
    cache: TokenCache
    feed: ChangeFeed
    metrics: Metrics
    settings: Callable[[], Settings]  # the live configuration version (roles, routes)
    changed: Callable[[str], None]  # apply a change to user NAME on this instance at once


CONTEXT = web.AppKey("context", AdminContext)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while this instance can serve (the store answers)."""
    try:
        await request.app[CONTEXT].store.ping()
    except StoreUnavailable:
        return web.json_response(
            {"status": "unavailable", "detail": "the store cannot be reached"}, status=503
        )
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics."""
    context = request.app[CONTEXT]
    context.metrics.store_healthy.set(1 if context.feed.healthy else 0)
    context.metrics.cached_identities.set(len(context.cache))
    context.metrics.cache_hits.set(context.authenticator.cache_hits)
    context.metrics.cache_misses.set(context.authenticator.cache_misses)
    return web.Response(body=context.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def build_admin_app(context: AdminContext) -> web.Application:
    """The admin listener's app (separate port, loopback by default)."""
    app = web.Application()
    app[CONTEXT] = context
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
