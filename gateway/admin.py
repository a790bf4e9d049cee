"""The admin listener's application: health, readiness, metrics and the admin REST API.

Imports: errors, auth, changefeed, metrics, decision (Settings), lifecycle, services, store, headers,
admin_api (the /v1 handlers), openapi, aiohttp, aiohttp-cors.

Error choices: a body that is not a JSON object sent as application/json is 400
`bad_request`; an unknown field or a wrong type is 422 `invalid` naming the field; a body
over 64 KiB is 413 `body_too_large`; a wrong method is 405 `method_not_allowed` with
`Allow`. Bodies are checked before the user or token is looked up (422 before 404).

One middleware owns the outside of the listener: every /v1 request needs an admin
identity's bearer token (401 realm "gateway-admin", 403 for a service user's token), and
every error, unknown path (404) and wrong method (405) included, is the JSON refusal
`{"error", "detail"}` with an `X-Request-Id` header. /healthz, /readyz, /metrics,
/jwks.json and /openapi.json need no token, nor do the console's static files under /console/
(README "Console": the page sends the admin token it is given on every /v1 call), which carry
CONTRACT.md's security headers, errors included.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol

import aiohttp_cors
from aiohttp import hdrs, web

from gateway.admin_api import MAX_BODY_BYTES, PRINCIPAL, AdminApi, Handler
from gateway.auth import Authenticator, TokenCache, retrieve_exception
from gateway.changefeed import ChangeFeed
from gateway.cors import OriginIndex
from gateway.decision import Settings
from gateway.errors import (
    AdminUnauthorized,
    Forbidden,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
    refusal,
)
from gateway.explain import CredentialCheck
from gateway.headers import request_id_from
from gateway.lifecycle import Lifecycle
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.openapi import openapi_document
from gateway.services import Directory
from gateway.store import Store


class ChangeHook(Protocol):
    """Applies a change to user `user` on this instance; done when the awaitable is.

    `origins=False` skips re-reading allowed origins (for changes that cannot touch them).
    """

    def __call__(self, user: str, *, origins: bool = True) -> Awaitable[None]: ...


@dataclass(frozen=True, slots=True)
class AdminContext:
    """What the admin listener needs from the running gateway (built in app.py)."""

    store: Store
    directory: Directory
    authenticator: Authenticator  # admin tokens are checked like any token, then kind == "admin"
    credentials: CredentialCheck  # the proxy's credential chain (gw_ tokens and access tokens): explain
    cache: TokenCache
    feed: ChangeFeed
    metrics: Metrics
    settings: Callable[[], Settings]  # the live configuration version (roles, routes)
    origins: OriginIndex  # origins some active user allows (explain's origin step)
    changed: ChangeHook  # apply a change to user NAME on this instance before answering
    lifecycle: Lifecycle  # draining: /readyz is 503 so load balancers stop sending
    jwks: Callable[[], dict[str, Any]]  # the public signing keys (README "API keys and short-lived tokens")
    refresh_metrics: Callable[[], None]  # values read at scrape time (cache size, feed health…)


CONTEXT = web.AppKey("context", AdminContext)
CORS_ENABLED = web.AppKey("cors_enabled", bool)

log = logging.getLogger("gateway.admin")

_HTTP_CODES: Final = {
    400: Refusal.BAD_REQUEST.value,
    403: Refusal.FORBIDDEN.value,
    404: Refusal.NOT_FOUND.value,
    405: Refusal.METHOD_NOT_ALLOWED.value,
    413: Refusal.BODY_TOO_LARGE.value,
}
_HTTP_DETAILS: Final = {
    404: "no such admin endpoint (see /openapi.json)",
    405: "method not allowed on this endpoint (see /openapi.json)",
    413: f"the body is larger than {MAX_BODY_BYTES} bytes",
}


CONSOLE_PREFIX: Final = "/console"
# The console's files (gateway/console/, shipped as package data) and their types: no other name
# is served, so nothing else in the package can be read through /console/.
CONSOLE_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONSOLE_HEADERS: Final = {
    # No inline script or style anywhere in the console, so no 'unsafe-inline'.
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # for browsers older than frame-ancestors
}


def _is_console(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


def _needs_admin(request: web.Request) -> bool:
    if request.path != "/v1" and not request.path.startswith("/v1/"):
        return False
    # A CORS preflight carries no credentials by design (browsers never send them).
    preflight = request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    return not (preflight and request.app[CORS_ENABLED])


async def _admin_principal(request: web.Request) -> None:
    context = request.app[CONTEXT]
    try:
        principal = await context.authenticator.authenticate(request.headers.getall(hdrs.AUTHORIZATION, []))
    except AdminUnauthorized:
        raise
    except Unauthenticated as error:
        raise AdminUnauthorized(error.refusal, error.message) from None
    if principal.kind != "admin":
        raise Forbidden("only admin identities may call the admin API")
    request[PRINCIPAL] = principal


def _http_error(request: web.Request, exc: web.HTTPException, request_id: str) -> web.Response:
    """aiohttp's own HTTP errors (routing, body size, CORS preflight) as JSON refusals."""
    status = exc.status if exc.status >= 400 else 500
    code = _HTTP_CODES.get(status, "bad_request" if status < 500 else Refusal.INTERNAL_ERROR.value)
    if status == 403 and request.method == hdrs.METH_OPTIONS:
        code = Refusal.ORIGIN_NOT_ALLOWED.value  # aiohttp-cors refused a preflight
    detail = _HTTP_DETAILS.get(status) or exc.text or exc.reason
    headers = {"X-Request-Id": request_id}
    if status == 405 and hdrs.ALLOW in exc.headers:
        headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin authentication for /v1 and JSON errors with X-Request-Id for everything."""
    request_id = request_id_from(request.headers)
    try:
        if _needs_admin(request):
            await _admin_principal(request)
        response = await handler(request)
    except GatewayError as error:
        response = refusal(error, request_id)
    except web.HTTPRequestEntityTooLarge:
        response = refusal(PayloadTooLarge(_HTTP_DETAILS[413]), request_id)
    except web.HTTPException as exc:
        response = _http_error(request, exc, request_id)
    except Exception:
        # Never a bare 500 page: the client gets the JSON shape and the id to find the log line.
        log.exception("admin request failed", extra={"request_id": request_id, "path": request.path})
        response = refusal(GatewayError(f"internal error (request id {request_id})"), request_id)
    if not response.prepared:
        response.headers.setdefault("X-Request-Id", request_id)
        if _is_console(request.path):
            response.headers.update(CONSOLE_HEADERS)
        if request.app[CORS_ENABLED] and hdrs.ORIGIN in request.headers:
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def jwks(request: web.Request) -> web.Response:
    """The public keys that verify the gateway's JWTs (no token needed: they are public)."""
    context = request.app[CONTEXT]
    age = int(context.settings().config.signing.publish_ahead)
    return web.json_response(context.jwks(), headers={"Cache-Control": f"public, max-age={age}"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while this instance can serve (its change feed and a ping read the store),
    503 from the shutdown signal on.

    The ping is bounded by the store timeout and left to end in the background: a store
    that stops answering silently would otherwise hold the load balancer's probe for the
    driver's whole timeout.
    """
    context = request.app[CONTEXT]
    if context.lifecycle.draining:
        return web.json_response({"status": "draining", "detail": "the gateway is shutting down"}, status=503)
    ping = asyncio.ensure_future(context.store.ping())
    ping.add_done_callback(retrieve_exception)
    done, _ = await asyncio.wait((ping,), timeout=context.feed.store_timeout)
    if not done:
        ping.cancel()
    if not context.feed.healthy or not done or ping.exception() is not None:
        return web.json_response(
            {"status": "unavailable", "detail": "the store cannot be reached"}, status=503
        )
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the gateway's metrics (every worker's, under --workers)."""
    context = request.app[CONTEXT]
    context.refresh_metrics()
    return web.Response(body=context.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this listener (role names from the live policies/)."""
    roles = request.app[CONTEXT].settings().table.role_names()
    return web.Response(body=json.dumps(openapi_document(roles)).encode(), content_type="application/json")


def _console_files() -> dict[str, bytes]:
    """The console's files, read once from the installed package."""
    folder = resources.files("gateway") / "console"
    return {name: (folder / name).read_bytes() for name in CONSOLE_FILES}


def _console_handlers() -> tuple[Handler, Handler, Handler]:
    """GET /console (redirect), /console/ (the page) and /console/{file} (only CONSOLE_FILES)."""
    files = _console_files()

    def answer(name: str) -> web.Response:
        # no-cache: a browser revalidates, so a new gateway version never runs an old script.
        return web.Response(
            body=files[name], headers={"Content-Type": CONSOLE_FILES[name], "Cache-Control": "no-cache"}
        )

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={hdrs.LOCATION: CONSOLE_PREFIX + "/"})

    async def index(request: web.Request) -> web.Response:
        return answer("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in files:
            raise NotFound("no such console file")
        return answer(name)

    return redirect, index, asset


async def _close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    # A request read before the shutdown signal is answered after it: it must say close too.
    if request.app[CONTEXT].lifecycle.draining:
        response.force_close()
        response.headers["Connection"] = "close"


def build_admin_app(context: AdminContext) -> web.Application:
    """The admin listener's app (separate port, loopback by default)."""
    app = web.Application(middlewares=[admin_middleware], client_max_size=MAX_BODY_BYTES)
    app[CONTEXT] = context
    app.on_response_prepare.append(_close_while_draining)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/jwks.json", jwks)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    redirect, index, asset = _console_handlers()
    app.router.add_get(CONSOLE_PREFIX, redirect)
    app.router.add_get(CONSOLE_PREFIX + "/", index)
    app.router.add_get(CONSOLE_PREFIX + "/{file}", asset)
    api_routes = [
        app.router.add_route(method, path, handler) for method, path, handler in AdminApi(context).routes()
    ]
    # CORS (aiohttp-cors) only when gateway.yaml lists admin.cors_origins; they are read once,
    # here, so a change to them needs a restart (like the listeners).
    origins = context.settings().config.admin_cors_origins
    app[CORS_ENABLED] = bool(origins)
    if origins:
        options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]
            allow_headers=("Authorization", "Content-Type"),
            expose_headers=("X-Request-Id",),
            max_age=600,
        )
        cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
        for route in api_routes:
            cors.add(route)
    return app
