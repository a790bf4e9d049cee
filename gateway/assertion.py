"""The signed identity assertion for upstreams (route key `assertion: true`).

Imports: decision, keyring, signing.

Plain identity headers say who the caller is only to an upstream that trusts its network;
an assertion proves it came through this gateway (Pomerium's `X-Pomerium-Jwt-Assertion`,
Oathkeeper's id_token mutator). It is a JWT signed with the gateway's keys (verify it with
the JWKS), made for one request: it names the route as `aud` and the method and path the
upstream receives, so an assertion captured on one request cannot vouch for another, and
it lives 60 seconds. The proxy never accepts one as a credential (its `typ` differs).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from math import floor
from urllib.parse import urlsplit

from gateway import signing
from gateway.decision import Decision, Settings
from gateway.errors import StoreUnavailable
from gateway.keyring import KeyRing

ASSERTION_TYPE = "gateway-assertion+jwt"
LIFETIME = 60  # seconds


class Assertions:
    """Signs one assertion per forwarded request on routes that ask for it."""

    def __init__(self, ring: Callable[[], KeyRing], clock: Callable[[], float] = time.time) -> None:
        self._ring = ring
        self._clock = clock
        self._base_paths: dict[str, str] = {}

    def sign(self, settings: Settings, decision: Decision, target_path: str, request_id: str) -> str:
        """The assertion for an allowed, non-public `decision` forwarded to `target_path`."""
        route, principal = decision.route, decision.principal
        assert route is not None and principal is not None
        now = self._clock()
        signer = self._ring().signer(now)
        if signer is None or signer.private is None:
            raise StoreUnavailable("no signing key is available on this instance; try again shortly")
        issued = floor(now)
        claims = {
            "iss": settings.config.signing.issuer,
            "aud": f"route:{route.config.name}",
            "sub": principal.user,
            "roles": list(decision.roles),
            "token_id": principal.token_id,
            "method": decision.method,
            "path": self._base_path(route.config.upstream) + target_path,
            "request_id": request_id,
            "iat": issued,
            "exp": issued + LIFETIME,
            "jti": secrets.token_urlsafe(16),
        }
        return signing.sign(claims, kid=signer.kid, alg=signer.alg, key=signer.private, typ=ASSERTION_TYPE)

    def _base_path(self, upstream: str) -> str:
        # The upstream URL's own path comes first in the request line the upstream reads.
        base = self._base_paths.get(upstream)
        if base is None:
            base = self._base_paths[upstream] = urlsplit(upstream).path
        return base
