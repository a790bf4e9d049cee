"""CORS on the proxy: per-route settings, the in-memory index of allowed origins, the answers.

Imports: config, errors, store. No I/O on the request path: the store's origins are read
into `OriginIndex` at start, again whenever the change feed reports a change, and before
the admin API answers a change it made (so it applies on this instance at once).

Why not aiohttp-cors here: it keeps a fixed origin dict per aiohttp resource (our
routes reload and our origins live in the store, per user), sends
`Access-Control-Allow-Origin` on every response of a listed origin (also on a 403
`origin_not_allowed`), never sends `Vary: Origin`, answers failed preflights as
text/plain, and asserts when an upstream sent its own CORS headers. The admin listener,
whose resources and origins are fixed, does use it.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from gateway.config import CorsConfig, normalize_origin
from gateway.errors import OriginNotAllowed, StoreUnavailable
from gateway.store import Store

log = logging.getLogger("gateway.cors")

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")


@lru_cache(maxsize=4096)
def canonical_origin(value: str) -> str | None:
    """The normalised form of an `Origin` header value, or None when it is no usable origin."""
    try:
        return normalize_origin(value.strip())
    except ValueError:
        return None


class OriginIndex:
    """Origins that some active service user allows, held in memory and refreshed on change."""

    def __init__(self) -> None:
        self._origins: frozenset[str] = frozenset()
        self._started = 0  # refreshes begun so far
        self._applied = 0  # the latest-begun refresh whose result is in place

    def __contains__(self, origin: str) -> bool:
        return origin in self._origins

    def __len__(self) -> int:
        return len(self._origins)

    async def refresh(self, store: Store) -> None:
        """Re-read the allowed origins of every active service user (keeps the old set on failure).

        Refreshes may overlap (the change feed's in the background, the admin API's awaited);
        the one begun last wins, so an older read can never undo a newer one.
        """
        self._started += 1
        ticket = self._started
        try:
            origins = frozenset(await store.active_origins())
        except StoreUnavailable:
            log.warning("could not refresh allowed origins (store unreachable); keeping the previous set")
            return
        if ticket > self._applied:
            self._origins, self._applied = origins, ticket


class RouteCors:
    """One route's CORS answers, with its header values computed once per configuration."""

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        self._extra = frozenset(config.extra)
        self._allow_headers = ", ".join(config.allow_headers)
        self._expose_headers = ", ".join(config.expose_headers)
        self._max_age = str(config.max_age)

    def allowed_on_route(self, origin: str, index: OriginIndex) -> bool:
        """Whether any active user (or the route's fixed list) allows `origin` here."""
        return origin in self._extra or (self.config.store and origin in index)

    def allowed_for_user(self, origin: str, user_origins: frozenset[str]) -> bool:
        """Whether `origin` is allowed for a user whose allowed_origins are `user_origins`."""
        return origin in self._extra or (self.config.store and origin in user_origins)

    def preflight(self, origin: str | None, requested_method: str, index: OriginIndex) -> dict[str, str]:
        """Headers of a successful preflight answer; raises OriginNotAllowed."""
        if origin is None or not self.allowed_on_route(origin, index):
            raise OriginNotAllowed("this origin is not allowed to call this route")
        if _METHOD.fullmatch(requested_method) is None:
            raise OriginNotAllowed("Access-Control-Request-Method is not a valid method")
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": requested_method,
            "Access-Control-Max-Age": self._max_age,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        if self._allow_headers:
            headers["Access-Control-Allow-Headers"] = self._allow_headers
        return headers

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an actual response to an allowed `origin` (only Vary when None)."""
        if origin is None:
            return {"Vary": "Origin"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self._expose_headers:
            headers["Access-Control-Expose-Headers"] = self._expose_headers
        return headers
