"""The signed identity assertion for upstreams (route key `assertion: true`).

Imports: decision, errors, keyring, randomness, signing.

Plain identity headers say who the caller is only to an upstream that trusts its network;
an assertion proves it came through this gateway (Pomerium's `X-Pomerium-Jwt-Assertion`,
Oathkeeper's id_token mutator). It is a JWT signed with the gateway's keys (verify it with
the JWKS), made for one request: it names the route as `aud` and the method and path the
upstream receives, so an assertion captured on one request cannot vouch for another, and
it lives 60 seconds. The proxy never accepts one as a credential (its `typ` differs).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from math import floor
from urllib.parse import urlsplit

from gateway import signing
from gateway.decision import Decision, Settings
from gateway.errors import StoreUnavailable
from gateway.keyring import KeyRing, RingKey
from gateway.randomness import random_bytes

ASSERTION_TYPE = "gateway-assertion+jwt"
LIFETIME = 60  # seconds


def new_jti() -> str:
    """A fresh, unguessable assertion id: 22 url-safe characters (128 random bits, as
    `secrets.token_urlsafe(16)`), never the same twice, nor in a forked child."""
    return base64.urlsafe_b64encode(random_bytes(16)).rstrip(b"=").decode()


class Assertions:
    """Signs one assertion per forwarded request on routes that ask for it."""

    def __init__(self, ring: Callable[[], KeyRing], clock: Callable[[], float] = time.time) -> None:
        self._ring = ring
        self._clock = clock
        self._routes: dict[tuple[str, str], tuple[str, str]] = {}  # (name, upstream) → (aud, base path)
        self._signing: tuple[RingKey, signing.Signer] | None = None  # the current key and its signer

    def sign(self, settings: Settings, decision: Decision, target_path: str, request_id: str) -> str:
        """The assertion for an allowed, non-public `decision` forwarded to `target_path`."""
        route, principal = decision.route, decision.principal
        assert route is not None and principal is not None
        now = self._clock()
        key = self._ring().signer(now)
        if key is None or key.private is None:
            raise StoreUnavailable("no signing key is available on this instance; try again shortly")
        cached = self._signing
        if cached is not None and cached[0] is key:
            sign = cached[1]
        else:  # the first assertion, or the ring changed (rotation, reload)
            sign = signing.compact_signer(kid=key.kid, alg=key.alg, key=key.private, typ=ASSERTION_TYPE)
            self._signing = (key, sign)
        config = route.config
        known = self._routes.get((config.name, config.upstream))
        if known is None:
            # The upstream URL's own path comes first in the request line the upstream reads.
            known = (f"route:{config.name}", urlsplit(config.upstream).path)
            self._routes[(config.name, config.upstream)] = known
        issued = floor(now)
        return sign(
            {
                "iss": settings.config.signing.issuer,
                "aud": known[0],
                "sub": principal.user,
                "roles": list(decision.roles),
                "token_id": principal.token_id,
                "method": decision.method,
                "path": known[1] + target_path,
                "request_id": request_id,
                "iat": issued,
                "exp": issued + LIFETIME,
                "jti": new_jti(),
            }
        )
