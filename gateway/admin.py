"""The admin listener's application: health and readiness (the admin REST API grows here).

Imports: errors, changefeed, store, aiohttp.
"""

from __future__ import annotations

from aiohttp import web

from gateway.changefeed import ChangeFeed
from gateway.errors import StoreUnavailable
from gateway.store import Store

STORE = web.AppKey("store", Store)
FEED = web.AppKey("feed", ChangeFeed)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while this instance can serve (the store answers)."""
    try:
        await request.app[STORE].ping()
    except StoreUnavailable:
        return web.json_response(
            {"status": "unavailable", "detail": "the store cannot be reached"}, status=503
        )
    return web.json_response({"status": "ready"})


def build_admin_app(store: Store, feed: ChangeFeed) -> web.Application:
    """The admin listener's app (separate port, loopback by default)."""
    app = web.Application()
    app[STORE] = store
    app[FEED] = feed
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
