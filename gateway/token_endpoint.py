"""`POST /.gateway/token` (client credentials) and `GET /.gateway/jwks.json`, on the proxy listener.

Imports: auth, bearer, config, decision, errors, exchange, keyring, signing, store, tokens.

The exchange checks the API key through the token authenticator's bounded, cached store
lookups (so junk secrets can neither flood the store nor be told apart from a wrong
one), narrows the key's roles to the requested `scope`, and mints an RFC 9068 access
token that lives `signing.token_ttl` seconds, never past the key's own expiry. Answers
never hold a secret but the minted token, and are `no-store`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from math import floor

from aiohttp import web

from gateway import signing, tokens
from gateway.auth import Authenticator, LastUsed, check_state
from gateway.bearer import ACCESS_TOKEN_TYPE
from gateway.decision import Settings
from gateway.errors import GatewayError, OAuthError, Refusal, StoreUnavailable, Unauthenticated, refusal
from gateway.exchange import MAX_BODY, parse_token_request
from gateway.keyring import KeyRing
from gateway.limiter import RateLimiter
from gateway.metrics import Metrics
from gateway.store import Store

TOKEN_PATH = "/.gateway/token"
JWKS_PATH = "/.gateway/jwks.json"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_BAD_CLIENT = "the API key is unknown, expired or deleted, the secret is wrong, or its user is disabled"


@dataclass(frozen=True, slots=True)
class Answer:
    """An endpoint's response and what the access line says about it."""

    response: web.StreamResponse
    error: Refusal | None = None
    user: str | None = None
    key_id: str | None = None


class TokenEndpoint:
    """Mints access tokens for API keys, and publishes the public keys that verify them."""

    def __init__(
        self,
        tokens_: Authenticator,
        store: Store,
        ring: Callable[[], KeyRing],
        key_use: LastUsed,
        metrics: Metrics,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = tokens_
        self._limiter = limiter
        self._store = store
        self._ring = ring
        self._key_use = key_use
        self._exchanges = metrics.token_exchanges
        self._clock = clock

    def jwks(self, request: web.BaseRequest, settings: Settings) -> Answer:
        """GET /.gateway/jwks.json: the public keys, cacheable for at most `publish_ahead`."""
        if request.method not in ("GET", "HEAD"):
            return Answer(_method_not_allowed("GET"), Refusal.METHOD_NOT_ALLOWED)
        age = int(settings.config.signing.publish_ahead)
        response = web.json_response(
            self._ring().jwks(self._clock()), headers={"Cache-Control": f"public, max-age={age}"}
        )
        return Answer(response)

    async def exchange(
        self, request: web.BaseRequest, settings: Settings, query: str, request_id: str
    ) -> Answer:
        """POST /.gateway/token: an access token for a valid API key, or the RFC's refusal."""
        if request.method != "POST":
            return Answer(_method_not_allowed("POST"), Refusal.METHOD_NOT_ALLOWED)
        limits = settings.config.rate_limits
        try:
            body = await _read_body(request, settings.config.client.body_timeout)
            asked = parse_token_request(
                query=query,
                content_type=request.headers.get("Content-Type"),
                authorization=request.headers.getall("Authorization", []),
                body=body,
            )

            async def mint() -> Answer:
                return await self._mint(settings, asked.key_id, asked.secret, asked.scope)

            if limits.auth_failures is None:
                return await mint()
            # A wrong secret is a failed credential check like a bad bearer (README "Rate limits").
            address = settings.headers.client_address(request.headers, request.remote)
            return await self._limiter.guard(limits, address, asked.key_id + ":" + asked.secret, mint)
        except OAuthError as error:
            self._exchanges.labels(error.error).inc()
            return Answer(_oauth_response(error), error.refusal)
        except GatewayError as error:  # the store is unreachable (503), a body that timed out (408), 429
            self._exchanges.labels(error.refusal.value).inc()
            return Answer(refusal(error, request_id), error.refusal)

    async def _mint(
        self, settings: Settings, key_id: str, secret: str, scope: tuple[str, ...] | None
    ) -> Answer:
        if not tokens.is_well_formed(secret, tokens.KEY_PREFIX):
            raise OAuthError("invalid_client", _BAD_CLIENT, status=401, guessed=True)
        digest = tokens.digest(secret)
        try:
            # Under its own prefix: a token lookup (by a bare digest) must never find an API key.
            key = await self._tokens.cached("secret:" + digest, lambda: self._store.lookup_key(digest))
            now = self._clock()
            check_state(key, now)
        except Unauthenticated:
            raise OAuthError("invalid_client", _BAD_CLIENT, status=401, guessed=True) from None
        if not secrets.compare_digest(key.token_id.encode(), key_id.encode()) or key.kind != "service":
            raise OAuthError("invalid_client", _BAD_CLIENT, status=401, guessed=True)
        carried = settings.table.carried(key.token_roles, key.user_roles)
        roles = carried
        if scope is not None:
            # Narrowing may name a role reached through `includes` (writer → reader).
            reach = settings.table.reachable(carried)
            unknown = [role for role in scope if role not in reach]
            if unknown:
                raise OAuthError("invalid_scope", f"the key does not carry the role(s) {', '.join(unknown)}")
            roles = tuple(sorted(scope))
        signer = self._ring().signer(now)
        if signer is None or signer.private is None:
            raise StoreUnavailable("no signing key is available on this instance; try again shortly")
        config = settings.config.signing
        issued = floor(now)
        expires = issued + int(config.token_ttl)
        if key.expires_at is not None:
            expires = min(expires, floor(key.expires_at.timestamp()))
        claims = {
            "iss": config.issuer,
            "aud": config.audience,
            "sub": key.user,
            "client_id": key.token_id,
            "key_id": key.token_id,
            "roles": list(roles),
            "iat": issued,
            "exp": expires,
            "jti": secrets.token_urlsafe(16),
        }
        key_pair = signer.private
        token = signing.sign(claims, kid=signer.kid, alg=signer.alg, key=key_pair, typ=ACCESS_TOKEN_TYPE)
        self._key_use.touch(key.token_id, now)
        self._exchanges.labels("issued").inc()
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": max(expires - issued, 0),
            "scope": " ".join(roles),
        }
        return Answer(web.json_response(body, headers=_NO_STORE), user=key.user, key_id=key.token_id)


async def _read_body(request: web.BaseRequest, timeout: float) -> bytes:
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        raise OAuthError("invalid_request", "the body is larger than 8 KiB")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > MAX_BODY:
                    raise OAuthError("invalid_request", "the body is larger than 8 KiB")
                parts.append(chunk)
    except TimeoutError:
        raise OAuthError("invalid_request", "the body did not arrive in time") from None
    return b"".join(parts)


def _oauth_response(error: OAuthError) -> web.Response:
    headers = error.headers()
    headers.update(error.extra_headers)
    return web.json_response(error.body(), status=error.status_code, headers=headers)


def _method_not_allowed(allowed: str) -> web.Response:
    return web.json_response(
        {"error": "invalid_request", "error_description": f"use {allowed}"},
        status=405,
        headers={"Allow": allowed, **_NO_STORE},
    )
