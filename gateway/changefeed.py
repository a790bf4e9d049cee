"""The change feed: how every instance learns within a second what any process changed.

Imports: errors, store, auth (TokenCache).

Every mutation of users and tokens writes a row to the store's `changes` table in
the same transaction (the CLI, the admin API of any instance). Each instance polls
the newest rows every `interval` seconds, off the request path, and evicts the
affected users from its identity cache. While polls fail, cached identities are
served for at most `outage_grace` seconds (CONTRACT.md "Freshness and outages").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.auth import TokenCache
from gateway.errors import StoreUnavailable
from gateway.store import Change, Store

log = logging.getLogger("gateway.changefeed")

Listener = Callable[[list[Change]], None]


class ChangeFeed:
    """Polls the store's change table and applies what it finds to local caches."""

    def __init__(
        self,
        store: Store,
        cache: TokenCache,
        *,
        interval: float = 0.25,
        outage_grace: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache = cache
        self._interval = interval
        self._grace = outage_grace
        self._clock = clock
        self._cursor: int | None = None
        self._healthy = False
        self._outage = False
        self._last_ok = clock()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every batch of changes (e.g. the CORS origin index)."""
        self._listeners.append(listener)

    def trusted(self) -> bool:
        """Whether cached identities may still be served (store read recently enough)."""
        return self._healthy or self._clock() - self._last_ok <= self._grace

    @property
    def healthy(self) -> bool:
        """Whether the last poll of the store succeeded."""
        return self._healthy

    async def poll(self) -> None:
        """Read and apply every change since the last poll; never raises StoreUnavailable."""
        try:
            if self._cursor is None:
                # First contact: nothing cached yet, so only the position matters.
                self._cursor = await self._store.latest_change()
            else:
                while True:
                    changes = await self._store.changes_since(self._cursor, limit=1000)
                    if not changes:
                        break
                    self._apply(changes)
                    if len(changes) < 1000:
                        break
        except StoreUnavailable:
            if not self._outage:
                self._outage = True
                log.error("store unreachable: serving cached identities for at most %gs", self._grace)
            self._healthy = False
            return
        if not self._healthy and self._outage:
            log.warning("store reachable again: change feed at position %s", self._cursor)
        self._outage = False
        self._healthy = True
        self._last_ok = self._clock()

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            self._cache.evict_user(change.user)
        self._cursor = changes[-1].id
        for listener in self._listeners:
            listener(changes)

    async def run(self) -> None:
        """Poll forever (a background task of the server)."""
        while True:
            await self.poll()
            await asyncio.sleep(self._interval)
