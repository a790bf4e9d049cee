"""The proxy's credential step: a chain of authenticators, each "not mine" or a decision.

Imports: auth, config, errors, keyring, signing, store, tokens.

`gw_` tokens go to the token authenticator (gateway.auth); a JWT (three dot-separated
parts) to the access-token authenticator here; a `gwk_` API key secret is refused by its
shape (it is exchanged at the token endpoint, never sent as a bearer). The admin listener
uses the token authenticator alone, so it never accepts a JWT.

An access token is verified locally (signature, `kid`, `alg`, `typ`, `iss`, `aud`, `exp`)
and its verified claims are kept per token until a signing-key change, so a client that
sends the same JWT again costs a hash and a dict lookup. Revocation is not in the JWT: its
API key's current state (key expired or deleted, user disabled or deleted, roles) comes
from the identity cache under the key's id, which the change feed evicts like a token's,
so a change stops every token minted from the key at once here and within a second on
every other instance.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cachetools import TTLCache

from gateway import signing, tokens
from gateway.auth import Authenticator, bearer_token
from gateway.decision import Settings
from gateway.errors import Refusal, Unauthenticated
from gateway.keyring import KeyRing
from gateway.store import Principal, Store

ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068
_CLAIMS = ("sub", "key_id", "client_id", "jti")
_VERIFIED_ENTRIES = 10_000
_VERIFIED_SECONDS = 300.0


def _stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Verified:
    """A verified access token: its claims, and the Principal last derived from its key's state."""

    __slots__ = ("claims", "exp", "key_id", "key", "principal")

    def __init__(self, claims: dict[str, Any]) -> None:
        self.claims = claims
        self.exp: float = claims["exp"]
        self.key_id: str = claims["key_id"]
        self.key: Principal | None = None  # the cached key identity `principal` was derived from
        self.principal: Principal | None = None


class AccessTokens:
    """Verifies the access-token JWTs the token endpoint minted, and holds what it verified."""

    def __init__(
        self,
        tokens_: Authenticator,
        store: Store,
        ring: Callable[[], KeyRing],
        settings: Callable[[], Settings],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = tokens_
        self._store = store
        self._ring = ring
        self._settings = settings
        self._clock = clock
        self._verified: TTLCache[str, _Verified] = TTLCache(_VERIFIED_ENTRIES, _VERIFIED_SECONDS)

    def forget(self) -> None:
        """Drop every verified token (a signing key was rotated or revoked)."""
        self._verified.clear()

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of `token`, or a 401 naming why it is refused (never quoting it)."""
        return self._entry(token, self._clock()).claims

    def _entry(self, token: str, now: float) -> _Verified:
        digest = tokens.digest(token)
        entry = self._verified.get(digest)
        if entry is None:
            config = self._settings().config.signing
            try:
                claims = signing.verify(
                    token,
                    self._ring().verify_keys(now),
                    typ=ACCESS_TOKEN_TYPE,
                    issuer=config.issuer,
                    audience=config.audience,
                    required=_CLAIMS,
                    now=now,
                )
            except signing.ExpiredJwt as exc:
                expired = f"token expired on {_stamp(exc.expired_at)}"
                raise Unauthenticated(Refusal.TOKEN_EXPIRED, expired) from None
            except signing.InvalidJwt as exc:
                raise Unauthenticated(Refusal.INVALID_TOKEN, str(exc)) from None
            _check_shape(claims)
            entry = self._verified[digest] = _Verified(claims)
        elif entry.exp <= now - signing.MAX_LEEWAY:
            raise Unauthenticated(Refusal.TOKEN_EXPIRED, f"token expired on {_stamp(entry.exp)}")
        return entry

    async def authenticate(self, token: str) -> Principal:
        """The Principal of an access token: its claims, checked against its key's state now."""
        now = self._clock()
        entry = self._entry(token, now)
        key_id = entry.key_id
        # The key's state: a cache hit (no store query) unless the change feed evicted it.
        key = self._tokens.peek("key:" + key_id)
        if key is None:
            key = await self._tokens.cached("key:" + key_id, lambda: self._store.key_principal(key_id))
        if key.expires_at is not None and key.expires_at.timestamp() <= now:
            raise Unauthenticated(
                Refusal.TOKEN_EXPIRED,
                f"the API key {key_id} expired on {_stamp(key.expires_at.timestamp())}: "
                "tokens minted from it no longer work",
            )
        if key.disabled:
            raise Unauthenticated(Refusal.USER_DISABLED, f"user '{key.user}' is disabled")
        if entry.key is key and entry.principal is not None:
            return entry.principal  # the same key state as last time: the same identity
        claims = entry.claims
        if key.user != claims["sub"] or key.kind != "service":
            raise Unauthenticated(Refusal.INVALID_TOKEN, "the token's API key belongs to another user")
        expires = datetime.fromtimestamp(entry.exp, UTC)
        if key.expires_at is not None and key.expires_at < expires:
            expires = key.expires_at
        granted = set(claims["roles"])
        if key.token_roles is not None:
            # A role the key's own list has lost since the token was minted stays lost, even
            # when its user gets it back (as for a token's fixed list).
            granted &= self._settings().table.reachable(key.token_roles)
        principal = dataclasses.replace(key, token_roles=tuple(sorted(granted)), expires_at=expires)
        entry.key, entry.principal = key, principal
        return principal


def _check_shape(claims: dict[str, Any]) -> None:
    roles = claims.get("roles")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthenticated(Refusal.INVALID_TOKEN, "the token's roles claim is not a list of role names")
    for name in ("sub", "key_id", "client_id", "jti"):
        if not isinstance(claims.get(name), str):
            raise Unauthenticated(Refusal.INVALID_TOKEN, f"the token's '{name}' claim is not a string")
    if claims["key_id"] != claims["client_id"]:
        raise Unauthenticated(Refusal.INVALID_TOKEN, "the token's key_id and client_id differ")


class Credentials:
    """The proxy's authenticator chain: `gw_` tokens, then access-token JWTs."""

    def __init__(self, tokens_: Authenticator, access: AccessTokens) -> None:
        self._tokens = tokens_
        self._access = access

    async def authenticate(self, authorization: list[str], *, touch: bool = True) -> Principal:
        """The Principal for the request's Authorization header values, or a 400/401/503 refusal."""
        token = bearer_token(authorization)
        if token.startswith(tokens.PREFIX):
            return await self._tokens.authenticate_token(token, touch=touch)
        if token.startswith(tokens.KEY_PREFIX):
            raise Unauthenticated(
                Refusal.INVALID_TOKEN,
                "an API key secret is not a bearer credential: exchange it at POST /.gateway/token",
            )
        if token.count(".") == 2:
            return await self._access.authenticate(token)
        return await self._tokens.authenticate_token(token, touch=touch)  # refused as malformed
