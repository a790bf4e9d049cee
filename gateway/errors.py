"""The gateway's one error hierarchy; every refusal the outside sees is one of these.

Imports: aiohttp (for `refusal`, the JSON answer every listener sends).

```
GatewayError                      500 internal_error
├─ ConfigError                    startup/reload/check only: "file:line: what is wrong"
├─ RouteNotFound                  404 no_route
├─ BadRequest                     400 bad_request
├─ MethodNotAllowed               405 method_not_allowed (+ Allow)
├─ RequestTimeout                 408 request_timeout        a client that stopped sending its body
├─ PayloadTooLarge                413 body_too_large
├─ Unauthenticated                401 missing_token | invalid_token | token_expired | user_disabled
├─ Forbidden                      403 forbidden
│  └─ OriginNotAllowed            403 origin_not_allowed
├─ AdminUnauthorized              401 missing_token | invalid_token (admin listener realm)
├─ Invalid                        422 invalid (+ field)      admin bodies, CLI arguments
├─ NotFound                       404 not_found              admin resources, CLI
├─ Conflict                       409 conflict
├─ RateLimited                    429 rate_limited (+ Retry-After, RateLimit-Policy, RateLimit)
├─ StoreUnavailable               503 store_unavailable
├─ Overloaded                     503 overloaded             a per-process capacity limit is reached
├─ UpstreamError                  502 upstream_unavailable
│  └─ UpstreamTimeout             504 upstream_timeout
└─ OAuthError                     400/401 the token endpoint's RFC 6749 errors: {"error", "error_description"}
```

Each instance carries a *public* message (safe to show a client); internal detail
travels in ``raise ... from exc`` and is only logged.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from aiohttp import web


class Refusal(enum.StrEnum):
    """The closed set of `error` codes (README "How a request is decided"); metrics label with these."""

    BAD_REQUEST = "bad_request"
    BODY_TOO_LARGE = "body_too_large"
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    USER_DISABLED = "user_disabled"
    FORBIDDEN = "forbidden"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    NO_ROUTE = "no_route"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID = "invalid"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    STORE_UNAVAILABLE = "store_unavailable"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[Refusal] = Refusal.INTERNAL_ERROR
    # Header lines a step added to this refusal (rate limits: RateLimit-Policy, RateLimit, Retry-After).
    extra_headers: tuple[tuple[str, str], ...] = ()

    @property
    def guessed(self) -> bool:
        """Whether a credential was presented and refused (counted by `rate_limits.auth_failures`)."""
        return False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def refusal(self) -> Refusal:
        """The JSON `error` code of this error."""
        return self.code

    def headers(self) -> dict[str, str]:
        """Extra response headers this refusal carries."""
        return {}


class ConfigError(GatewayError):
    """A config or policy file is wrong; `problems` holds "file:line: what is wrong" lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class RouteNotFound(GatewayError):
    """No route prefix matches the request path."""

    status = 404
    code = Refusal.NO_ROUTE


class BadRequest(GatewayError):
    """Ambiguous or malformed path, malformed header."""

    status = 400
    code = Refusal.BAD_REQUEST


class MethodNotAllowed(GatewayError):
    """A method the gateway never forwards (TRACE, or CONNECT where no rule names it)."""

    status = 405
    code = Refusal.METHOD_NOT_ALLOWED

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class RequestTimeout(GatewayError):
    """The client paused its request body for longer than `limits.body_timeout`."""

    status = 408
    code = Refusal.REQUEST_TIMEOUT


class PayloadTooLarge(GatewayError):
    """The request body is larger than the route's `max_body`."""

    status = 413
    code = Refusal.BODY_TOO_LARGE


class Unauthenticated(GatewayError):
    """No usable credentials on the proxy listener (401 + WWW-Authenticate)."""

    status = 401
    realm: ClassVar[str] = "gateway"

    def __init__(self, code: Refusal, message: str) -> None:
        super().__init__(message)
        self._code = code

    @property
    def refusal(self) -> Refusal:
        return self._code

    @property
    def guessed(self) -> bool:
        return self._code is not Refusal.MISSING_TOKEN  # no credential at all: nothing was guessed

    def headers(self) -> dict[str, str]:
        # RFC 6750 section 3: no error attribute when the request carried no credentials.
        if self._code is Refusal.MISSING_TOKEN:
            return {"WWW-Authenticate": f'Bearer realm="{self.realm}"'}
        return {"WWW-Authenticate": f'Bearer realm="{self.realm}", error="invalid_token"'}


class AdminUnauthorized(Unauthenticated):
    """No usable admin credentials on the admin listener."""

    realm = "gateway-admin"


class Forbidden(GatewayError):
    """The identity is known but lacks the permission (or no rule matched)."""

    status = 403
    code = Refusal.FORBIDDEN


class OriginNotAllowed(Forbidden):
    """The browser Origin is not allowed for this user on this route."""

    code = Refusal.ORIGIN_NOT_ALLOWED


class Invalid(GatewayError):
    """A field of an admin body or CLI argument is invalid (422, names the field)."""

    status = 422
    code = Refusal.INVALID

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(GatewayError):
    """An admin resource (user, token) does not exist."""

    status = 404
    code = Refusal.NOT_FOUND


class Conflict(GatewayError):
    """The resource already exists."""

    status = 409
    code = Refusal.CONFLICT


class RateLimited(GatewayError):
    """A rate limit is reached (README "Rate limits"); the request consumed nothing."""

    status = 429
    code = Refusal.RATE_LIMITED

    def __init__(self, message: str, headers: tuple[tuple[str, str], ...]) -> None:
        super().__init__(message)
        self.extra_headers = headers


class StoreUnavailable(GatewayError):
    """The store cannot be reached and the answer is not in the cache."""

    status = 503
    code = Refusal.STORE_UNAVAILABLE


class Overloaded(GatewayError):
    """A per-process capacity limit is reached (connections, concurrent store lookups)."""

    status = 503
    code = Refusal.OVERLOADED

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UpstreamError(GatewayError):
    """The upstream refused or broke the connection."""

    status = 502
    code = Refusal.UPSTREAM_UNAVAILABLE


class UpstreamTimeout(UpstreamError):
    """The upstream was slower than the route's timeout."""

    status = 504
    code = Refusal.UPSTREAM_TIMEOUT


def refusal(error: GatewayError, request_id: str) -> web.Response:
    """The JSON refusal for `error`, with X-Request-Id."""
    body = {"error": error.refusal.value, "detail": error.message}
    if isinstance(error, Invalid):
        body["field"] = error.field
    headers = error.headers()
    headers.update(error.extra_headers)
    headers["X-Request-Id"] = request_id
    return web.json_response(body, status=error.status, headers=headers)


class OAuthError(GatewayError):
    """A refusal of the token endpoint, in RFC 6749 section 5.2's shape (not the gateway's).

    `error` is one of the RFC's codes: invalid_request, invalid_client, invalid_grant,
    unsupported_grant_type, invalid_scope. 401 invalid_client carries a Basic challenge.
    """

    code = Refusal.BAD_REQUEST

    def __init__(self, error: str, description: str, *, status: int = 400, guessed: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.status_code = status
        self._guessed = guessed  # an API key's secret was checked and is wrong

    @property
    def guessed(self) -> bool:
        return self._guessed

    @property
    def refusal(self) -> Refusal:
        return Refusal.INVALID_TOKEN if self.error == "invalid_client" else Refusal.BAD_REQUEST

    def headers(self) -> dict[str, str]:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.status_code == 401:
            headers["WWW-Authenticate"] = 'Basic realm="gateway"'
        return headers

    def body(self) -> dict[str, str]:
        """The RFC's JSON body."""
        return {"error": self.error, "error_description": self.message}
