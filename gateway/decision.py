"""The decision: may this request pass, and as whom? One function, three callers.

Imports: config, policy, paths, cors, handshake, headers, errors, store.

The proxy handler (then forwards), forward-auth `/.gateway/authz` (answers with it) and
explain (prints why) all call `Decider.decide`, so the order below exists exactly once
(README "How a request is decided"):

```
0 GATEWAY     /.gateway/* (decoded first segment)          → 404 no_route (never an upstream's path)
1 METHOD      TRACE, CONNECT (unless a rule names it)      → 405 method_not_allowed
2 ROUTE       longest prefix of the path                   → 404 no_route
3 PATH        canonical path (decoded once)                → 400 bad_request
  PREFLIGHT   OPTIONS + Origin + Access-Control-Request-Method on a cors route (proxy only)
4 RULE        first matching rule; public: skip to 7
5 CREDENTIAL  bearer → Principal (cache, then store)       → 401 …; 503 store_unavailable
              (a WebSocket handshake: checked, and its bearer.<credential> subprotocol → 400)
  (before it: the client address over `auth_failures`      → 429 rate_limited; a 401 counts one)
6 PERMISSION  the rule's permission, from carried roles    → 403 forbidden (also: no rule)
7 ORIGIN      Origin allowed for this user on this route   → 403 origin_not_allowed
8 LIMIT       the user's and the route's rate limits       → 429 rate_limited (public rules: none)
```

Only requests that `count` (the proxy and forward-auth) meet the rate limits: explain and
the re-check of an open WebSocket never consume from them.

The hot path pays for one small object per request: a `Decision` records what each step
found and the last step it reached, and `gateway.explain` turns that into a trace only
when somebody asks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from multidict import CIMultiDictProxy, MultiMapping

from gateway.config import Config
from gateway.cors import OriginIndex, RouteCors, canonical_origin
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    OriginNotAllowed,
    RouteNotFound,
)
from gateway.handshake import check_handshake, is_handshake, subprotocol_credential
from gateway.headers import HeaderPolicy
from gateway.limiter import RateLimiter
from gateway.paths import canonicalize
from gateway.policy import RoutePolicy, RouteTable, Rule, load_route_table
from gateway.ratelimit import RateHeaders
from gateway.store import Principal

# TRACE echoes the request (credentials included) back; CONNECT opens a tunnel past every rule.
_NEVER_FORWARDED = frozenset({"TRACE", "CONNECT"})
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# The methods the proxy listener's HTTP parser (llhttp) accepts, case-sensitive: forward-auth
# and explain refuse any other, so neither can allow what the proxy would never receive
# (a lower-case `delete` that an upstream framework upper-cases into DELETE).
HTTP_METHODS = frozenset(
    "DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH "
    "UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE "
    "UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
GATEWAY_SEGMENT = ".gateway"  # /.gateway/* belongs to the gateway itself (forward-auth, …)

Authenticate = Callable[[list[str]], Awaitable[Principal]]
"""The credential step: the request's Authorization values → a Principal, or a GatewayError."""

Headers = CIMultiDictProxy[str] | MultiMapping[str]


@dataclass(frozen=True, slots=True)
class Settings:
    """What one configuration version gives the decision and the proxy; swapped whole on reload."""

    config: Config
    table: RouteTable
    headers: HeaderPolicy
    cors: Mapping[str, RouteCors]  # by route name; routes without a `cors` block are absent
    connect_allowed: bool = False  # some rule names CONNECT in `methods` (else CONNECT is a 405)


def build_settings(config: Config) -> Settings:
    """Validate policies for `config` and build the pipeline's settings (raises ConfigError)."""
    table = load_route_table(config)
    return Settings(
        config=config,
        table=table,
        headers=HeaderPolicy(config.identity, config.trusted_proxies),
        cors={route.name: RouteCors(route.cors) for route in config.routes if route.cors is not None},
        connect_allowed=any(
            "CONNECT" in (rule.methods or ()) for route in table.routes for rule in route.rules
        ),
    )


class Decision:
    """What the steps found for one request; `error` is None when it may pass.

    `stage` is the last step reached ("method", "route", "path", "preflight", "rule",
    "credential", "permission", "origin", "limit", then "allowed"): with `error` it says which step refused.
    """

    # Class-level defaults, no __slots__: a request sets only the fields its steps reach, and
    # creating the object costs two stores instead of fourteen (it is made for every request).
    stage = "method"
    route: RoutePolicy | None = None
    canonical = ""
    encoded = ""  # the canonical path re-encoded: what the upstream receives
    rule: Rule | None = None
    principal: Principal | None = None
    roles: tuple[str, ...] = ()  # the roles the credential carries now, sorted
    cors: RouteCors | None = None
    has_origin = False  # an Origin header was sent on a route with a cors block
    origin: str | None = None  # its normalised value (None: not a usable origin)
    preflight: dict[str, str] | None = None  # a CORS preflight's answer headers
    websocket = False  # a WebSocket handshake on a `websocket: true` route
    subprotocols: tuple[str, ...] = ()  # what it offers, bearer entry removed
    rate_headers: RateHeaders = ()  # RateLimit-Policy and RateLimit for the answer
    error: GatewayError | None = None

    def __init__(self, method: str, raw_path: str) -> None:
        self.method = method
        self.raw_path = raw_path

    @property
    def allowed(self) -> bool:
        """Whether the request may pass."""
        return self.error is None

    def identity(self) -> tuple[str, str, str] | None:
        """(user, roles header value, token id) to send upstream; None on a public rule."""
        principal = self.principal
        if principal is None:
            return None
        return principal.user, ",".join(self.roles), principal.token_id  # roles are sorted already

    def upstream_path(self) -> str:
        """The path the upstream receives (canonical, re-encoded, `strip_prefix` applied)."""
        route = self.route
        if route is not None and route.config.strip_prefix:
            return strip_prefix(self.encoded, route.config.prefix)
        return self.encoded


class Decider:
    """Runs the decision for one process: the credential step and the live allowed origins."""

    __slots__ = ("authenticate", "origins", "limiter")

    def __init__(
        self, authenticate: Authenticate, origins: OriginIndex, limiter: RateLimiter | None = None
    ) -> None:
        self.authenticate = authenticate
        self.origins = origins
        self.limiter = limiter

    async def decide(
        self,
        settings: Settings,
        method: str,
        raw_path: str,
        headers: Headers,
        *,
        preflight: bool = False,
        count: bool = False,
        peer: str | None = None,
    ) -> Decision:
        """Decide `method raw_path` (the path without its query) with the request's `headers`.

        Never raises a GatewayError: a refusal is `Decision.error`. With `preflight`, a CORS
        preflight on a cors route is answered (`Decision.preflight`) instead of decided. With
        `count`, the rate limits apply (`peer`: the connection's address).
        """
        decision = Decision(method, raw_path)
        try:
            if raw_path.startswith(("/.", "/%")) and is_gateway_path(raw_path):
                # First of all: the gateway's own paths are never forwarded, whatever the routes say.
                decision.stage = "route"
                raise RouteNotFound(
                    f"no route for path {printable(raw_path)}: /.gateway/ belongs to the gateway itself"
                )
            if method in _NEVER_FORWARDED and not (method == "CONNECT" and settings.connect_allowed):
                raise MethodNotAllowed(f"the gateway never forwards {method}", _ALLOW)
            decision.stage = "route"
            table = settings.table
            route, canonical, encoded = resolve(table, raw_path, decision)
            decision.route = route
            decision.canonical = canonical
            decision.encoded = encoded
            cors = settings.cors.get(route.config.name)
            if cors is not None:
                decision.cors = cors
                value = headers.get("Origin")
                if value is not None:
                    decision.has_origin = True
                    decision.origin = canonical_origin(value)
                    if preflight and method == "OPTIONS":
                        requested = headers.get("Access-Control-Request-Method")
                        if requested is not None:
                            # A preflight carries no credentials: answered here, never forwarded.
                            decision.stage = "preflight"
                            decision.preflight = cors.preflight(decision.origin, requested, self.origins)
                            return decision
            decision.stage = "rule"
            rule = route.first_match(method, canonical)
            decision.rule = rule
            authorization = headers.getall("Authorization", [])
            if route.config.websocket and "Upgrade" in headers and is_handshake(method, headers):
                # Where the credential may also be: the handshake's subprotocol list.
                decision.stage = "credential"
                check_handshake(headers)
                authorization, decision.subprotocols = subprotocol_credential(headers, authorization)
                decision.websocket = True
            if rule is None or not rule.public:
                decision.stage = "credential"
                limiter = self.limiter if count else None
                if limiter is not None and settings.config.rate_limits.auth_failures is not None:
                    principal = await self.authenticate_limited(
                        limiter, settings, authorization, headers, peer
                    )
                else:
                    principal = await self.authenticate(authorization)
                decision.principal = principal
                decision.stage = "permission"
                roles = table.carried(principal.token_roles, principal.user_roles)
                decision.roles = roles
                authorize(table, principal, roles, rule, method, canonical)
            elif len(authorization) > 1:
                decision.stage = "credential"
                raise BadRequest("more than one Authorization header")
            if decision.has_origin:
                decision.stage = "origin"
                self.check_origin(decision)
            user = decision.principal
            if count and user is not None and self.limiter is not None:
                limits = settings.config.rate_limits
                route_limit = route.config.rate_limit
                if limits.per_user is not None or route_limit is not None or user.rate_limit is not None:
                    decision.stage = "limit"
                    name = route.config.name
                    # The memory store answers at once: no coroutine (a Redis store's round trip is awaited).
                    rate_headers = self.limiter.admit_now(limits, user, name, route_limit)
                    if rate_headers is None:
                        rate_headers = await self.limiter.admit(limits, user, name, route_limit)
                    decision.rate_headers = rate_headers
            decision.stage = "allowed"
        except GatewayError as error:
            decision.error = error
        return decision

    def authenticate_limited(
        self,
        limiter: RateLimiter,
        settings: Settings,
        authorization: list[str],
        headers: Headers,
        peer: str | None,
    ) -> Awaitable[Principal]:
        """The credential step under `auth_failures` (README "Rate limits"), to await."""
        address = settings.headers.client_address(headers, peer)
        limits, credential = settings.config.rate_limits, "\n".join(authorization)
        # The guard's coroutine itself, not one more wrapped around it (this runs per request).
        return limiter.guard(limits, address, credential, lambda: self.authenticate(authorization))

    def check_origin(self, decision: Decision) -> None:
        """Refuse unless the request's origin is allowed for its user (or, public, on its route)."""
        origin, cors, principal = decision.origin, decision.cors, decision.principal
        if origin is not None and cors is not None:
            if principal is not None and cors.allowed_for_user(origin, principal.origins):
                return
            if principal is None and cors.allowed_on_route(origin, self.origins):
                return  # a public rule: no user, so any origin allowed on the route
        raise OriginNotAllowed("this origin is not allowed for this service user on this route")


def is_gateway_path(raw_path: str) -> bool:
    """Whether `raw_path`'s first segment, decoded, is `.gateway` (so `/%2Egateway/x` is one too)."""
    first = raw_path[1:].split("/", 1)[0]
    if "%" in first:
        try:
            first = unquote(first, errors="strict")
        except UnicodeDecodeError:
            return False  # not UTF-8 once decoded, so not ".gateway"
    return first == GATEWAY_SEGMENT


def resolve(table: RouteTable, raw_path: str, decision: Decision) -> tuple[RoutePolicy, str, str]:
    """(route, canonical path, encoded path) for `raw_path`: 404 before 400, as the order says."""
    try:
        canonical, encoded = canonicalize(raw_path)
    except BadRequest:
        # Route first, then path checks: an unroutable bad path is still a 404.
        found = table.route(raw_path.split("%", 1)[0] or "/")
        if found is None:
            raise RouteNotFound(f"no route for path {printable(raw_path)}") from None
        decision.route = found
        decision.stage = "path"
        raise
    route = table.route(canonical)
    if route is None:
        raise RouteNotFound(f"no route for path {printable(canonical)}")
    return route, canonical, encoded


def authorize(
    table: RouteTable, principal: Principal, roles: tuple[str, ...], rule: Rule | None, method: str, path: str
) -> None:
    """Refuse (403) unless `rule` exists and the carried `roles` grant its permission."""
    if principal.kind != "service":
        raise Forbidden("admin tokens are for the admin API only; they never pass the proxy")
    if rule is None:
        raise Forbidden(f"no rule allows {method} {printable(path)}")
    required = rule.require
    if required is None or not table.allows(roles, required):
        raise Forbidden(f"permission '{required}' is required")


def strip_prefix(encoded: str, prefix: str) -> str:
    """`encoded` without the route's prefix (`/orders/1` → `/1`; the prefix alone → `/`)."""
    # Count segments, not characters: the encoded path may spell the prefix differently.
    depth = 0 if prefix == "/" else prefix.count("/")
    parts = encoded.split("/", depth + 1)
    return "/" + parts[depth + 1] if len(parts) > depth + 1 else "/"


def printable(path: str) -> str:
    """`path` cut to 200 characters for messages and logs."""
    return path if len(path) <= 200 else path[:200] + "…"
