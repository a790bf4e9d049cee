"""The proxy handler: every request on the proxy listener runs this pipeline, top to bottom.

Imports: config, policy, paths, auth, headers, proxy, errors, logs.

```
1 ROUTE     table.route(path)                        → 404 no_route
2 CANON     paths.canonicalize(raw path)             → 400 bad_request
3 RULE      route.first_match(method, path)          → public: skip to 6
4 AUTHN     bearer → Principal (cache, then store)   → 401 missing_token | invalid_token |
                                                       token_expired | user_disabled; 503 store_unavailable
5 AUTHZ     permission of the rule; no rule → deny   → 403 forbidden
6 MUTATE    strip client identity/hop-by-hop/forwarding headers, then set ours
7 FORWARD   stream to the upstream and back          → 502 upstream_unavailable | 504 upstream_timeout
8 RECORD    one JSON line per request
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter

from gateway.auth import Authenticator
from gateway.config import Config
from gateway.cors import OriginIndex, RouteCors, canonical_origin
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    Invalid,
    MethodNotAllowed,
    OriginNotAllowed,
    Refusal,
    RouteNotFound,
)
from gateway.headers import HeaderPolicy, request_id_from
from gateway.logs import write_access
from gateway.metrics import Metrics
from gateway.paths import canonicalize, split_target
from gateway.policy import RoutePolicy, RouteTable, Rule
from gateway.proxy import Forwarder, Outcome, refuse_oversized, refuse_transfer_codings
from gateway.store import Principal

log = logging.getLogger("gateway.pipeline")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# TRACE echoes the request (credentials included) back; CONNECT opens a tunnel past every rule.
_NEVER_FORWARDED = frozenset({"TRACE", "CONNECT"})
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


@dataclass(frozen=True, slots=True)
class Settings:
    """What one configuration version gives the pipeline; swapped whole on reload."""

    config: Config
    table: RouteTable
    headers: HeaderPolicy
    cors: Mapping[str, RouteCors]  # by route name; routes without a `cors` block are absent
    connect_allowed: bool = False  # some rule names CONNECT in `methods` (else CONNECT is a 405)


class Pipeline:
    """The proxy listener's request handler (one per process)."""

    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        forwarder: Forwarder,
        metrics: Metrics,
        origins: OriginIndex,
    ) -> None:
        self.settings = settings
        self._authenticator = authenticator
        self._forwarder = forwarder
        self._metrics = metrics
        # labels() is a lock and a dict walk; the children are looked up once per (route, status).
        self._request_counters: dict[tuple[str | None, int], Counter] = {}
        self._origins = origins

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Run the pipeline for one request; never raises a GatewayError."""
        started = time.perf_counter()
        settings = self.settings  # one version for the whole request, even across a reload
        request_id = request_id_from(request.headers)
        raw_path, query = split_target(request.raw_path)
        route: RoutePolicy | None = None
        principal: Principal | None = None
        cors: RouteCors | None = None
        origin: str | None = None
        outcome = Outcome()
        try:
            if request.method in _NEVER_FORWARDED:
                _refuse_method(request.method, settings)
            route, canonical, encoded = _resolve(settings.table, raw_path)
            if "Transfer-Encoding" in request.headers:
                refuse_transfer_codings(request)
            config = route.config
            cors = settings.cors.get(config.name)
            if cors is not None and "Origin" in request.headers:
                origin = canonical_origin(request.headers["Origin"])
                requested = request.headers.get("Access-Control-Request-Method")
                if request.method == "OPTIONS" and requested is not None:
                    # A preflight carries no credentials: answered here, never forwarded.
                    preflight = cors.preflight(origin, requested, self._origins)
                    preflight["X-Request-Id"] = request_id
                    self._record(request, started, raw_path, request_id, route, None, 204, None, outcome)
                    return web.Response(status=204, headers=preflight)
            rule = route.first_match(request.method, canonical)
            authorization = request.headers.getall("Authorization", [])
            roles: tuple[str, ...] = ()
            if rule is None or not rule.public:
                principal = await self._authenticator.authenticate(authorization)
                roles = settings.table.carried(principal.token_roles, principal.user_roles)
                _authorize(settings.table, principal, roles, rule, request.method, canonical)
            elif len(authorization) > 1:
                raise BadRequest("more than one Authorization header")
            if cors is not None and "Origin" in request.headers:
                self._check_origin(cors, origin, principal)
            identity = None
            if principal is not None:
                identity = (principal.user, ",".join(roles), principal.token_id)  # sorted already
            headers = settings.headers.upstream_headers(
                request.headers,
                peer=request.remote,
                scheme=request.scheme,
                preserve_host=config.preserve_host,
                request_id=request_id,
                identity=identity,
            )
            upstream_path = encoded
            if config.strip_prefix:
                upstream_path = _strip_prefix(encoded, config.prefix)
            body_limit = config.max_body or settings.config.max_body
            refuse_oversized(request, body_limit)
            if request.headers.get("Expect", "").lower() == "100-continue" and request.writer is not None:
                # Only now, after authorisation and the length check, may the client send its body.
                await request.writer.write(_CONTINUE)
            response = await self._forwarder.forward(
                request,
                config,
                upstream_path=upstream_path,
                query=query,
                headers=headers,
                body_limit=body_limit,
                cors_headers=cors.response_headers(origin) if cors is not None else None,
                request_id=request_id,
                outcome=outcome,
                limits=settings.config.client,
            )
        except GatewayError as error:
            response = refusal(error, request_id)
            if (
                cors is not None
                and origin is not None
                and not isinstance(error, OriginNotAllowed)
                and cors.allowed_on_route(origin, self._origins)
            ):
                # So the page can read the JSON error instead of a bare CORS failure.
                response.headers.update(cors.response_headers(origin))
            if request.body_exists and not request.content.is_eof():
                # An unread body must not be taken for the next request on this connection.
                response.force_close()
            self._record(
                request,
                started,
                raw_path,
                request_id,
                route,
                principal,
                response.status,
                error.refusal,
                outcome,
            )
            return response
        self._record(request, started, raw_path, request_id, route, principal, response.status, None, outcome)
        return response

    def record_listener_refusal(self, status: int, error: Refusal, request_id: str) -> None:
        """Count and log an answer the listener gave itself (a request the HTTP parser refused)."""
        self._metrics.requests.labels("", str(status)).inc()
        self._metrics.refusals.labels(error.value).inc()
        write_access(
            logging.ERROR if status >= 500 else logging.INFO,
            {
                "request_id": request_id,
                "method": None,
                "path": None,
                "route": None,
                "user": None,
                "token_id": None,
                "status": status,
                "upstream_status": None,
                "error": error.value,
                "duration_ms": 0.0,
            },
        )

    def _check_origin(self, cors: RouteCors, origin: str | None, principal: Principal | None) -> None:
        if origin is not None:
            if principal is not None and cors.allowed_for_user(origin, principal.origins):
                return
            if principal is None and cors.allowed_on_route(origin, self._origins):
                return  # a public rule: no user, so any origin allowed on the route
        raise OriginNotAllowed("this origin is not allowed for this service user on this route")

    def _record(
        self,
        request: web.BaseRequest,
        started: float,
        raw_path: str,
        request_id: str,
        route: RoutePolicy | None,
        principal: Principal | None,
        status: int,
        error: Refusal | None,
        outcome: Outcome,
    ) -> None:
        route_name = route.config.name if route is not None else None
        metrics = self._metrics
        counter = self._request_counters.get((route_name, status))
        if counter is None:
            counter = metrics.requests.labels(route_name or "", str(status))
            self._request_counters[(route_name, status)] = counter
        counter.inc()
        if error is not None:
            metrics.refusals.labels(error.value).inc()
        if outcome.upstream_seconds is not None and route_name is not None:
            metrics.upstream_latency.labels(route_name).observe(outcome.upstream_seconds)
        code = error.value if error is not None else outcome.error
        if outcome.client_gone:
            code = "client_disconnected"
        level = logging.ERROR if status >= 500 or outcome.error else logging.INFO
        write_access(
            level,
            {
                "request_id": request_id,
                "method": request.method,
                "path": _printable(raw_path),
                "route": route_name,
                "user": principal.user if principal is not None else None,
                "token_id": principal.token_id if principal is not None else None,
                "status": status,
                "upstream_status": outcome.upstream_status,
                "error": code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            },
        )


def _refuse_method(method: str, settings: Settings) -> None:
    if method == "CONNECT" and settings.connect_allowed:
        return
    raise MethodNotAllowed(f"the gateway never forwards {method}", _ALLOW)


def _resolve(table: RouteTable, raw_path: str) -> tuple[RoutePolicy, str, str]:
    try:
        canonical, encoded = canonicalize(raw_path)
    except BadRequest:
        # Route first, then path checks: an unroutable bad path is still a 404.
        if table.route(raw_path.split("%", 1)[0] or "/") is None:
            raise RouteNotFound(f"no route for path {_printable(raw_path)}") from None
        raise
    route = table.route(canonical)
    if route is None:
        raise RouteNotFound(f"no route for path {_printable(canonical)}")
    return route, canonical, encoded


def _authorize(
    table: RouteTable, principal: Principal, roles: tuple[str, ...], rule: Rule | None, method: str, path: str
) -> None:
    if principal.kind != "service":
        raise Forbidden("admin tokens are for the admin API only; they never pass the proxy")
    if rule is None:
        raise Forbidden(f"no rule allows {method} {_printable(path)}")
    required = rule.require
    if required is None or not table.allows(roles, required):
        raise Forbidden(f"permission '{required}' is required")


def _strip_prefix(encoded: str, prefix: str) -> str:
    # Count segments, not characters: the encoded path may spell the prefix differently.
    depth = 0 if prefix == "/" else prefix.count("/")
    parts = encoded.split("/", depth + 1)
    return "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"


def _printable(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "…"


def refusal(error: GatewayError, request_id: str) -> web.Response:
    """The JSON refusal for `error`, with X-Request-Id."""
    body = {"error": error.refusal.value, "detail": error.message}
    if isinstance(error, Invalid):
        body["field"] = error.field
    headers = error.headers()
    headers["X-Request-Id"] = request_id
    return web.json_response(body, status=error.status, headers=headers)
