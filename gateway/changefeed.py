"""The change feed: how every instance learns within a second what any process changed.

Imports: errors, store, auth (TokenCache, store_call_timeout, retrieve_exception).

Every mutation of users and tokens writes a row to the store's `changes` table in
the same transaction (the CLI, the admin API of any instance). Each instance polls
the newest rows every `interval` seconds, off the request path, and evicts the
affected users from its identity cache; on PostgreSQL a notification (gateway.notify)
wakes the poll at once. Cached identities are served only while the
last successful poll is at most `outage_grace` seconds old, whatever poll is in flight,
and every poll is cut off after `store_call_timeout(outage_grace)` (README "Freshness,
outages and several instances").

Retention removes old rows (gateway.retention) and records the newest id it removed. A
poll whose cursor is below that horizon may have missed a change it can no longer read:
it drops every cached identity and waits for the reset listeners (origins, signing keys)
before the feed counts as healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.auth import TokenCache, retrieve_exception, store_call_timeout
from gateway.errors import StoreUnavailable
from gateway.store import Change, Store

log = logging.getLogger("gateway.changefeed")

Listener = Callable[[list[Change]], None]
ResetListener = Callable[[], Awaitable[None]]

_BATCH = 1000


class ChangeFeed:
    """Polls the store's change table and applies what it finds to local caches."""

    def __init__(
        self,
        store: Store,
        cache: TokenCache,
        *,
        interval: float = 0.25,
        outage_grace: float = 5.0,
        store_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache = cache
        self._interval = interval
        self._grace = outage_grace
        self._timeout = store_call_timeout(outage_grace) if store_timeout is None else store_timeout
        # The oldest the last successful poll gets on a healthy feed (the next one starts an
        # interval later and may take the timeout). It is under the grace from a grace of 1 s;
        # a shorter grace (0 included) still lets identities be served until a poll fails or
        # is overdue.
        self._cadence = interval + self._timeout
        self._clock = clock
        self._cursor: int | None = None
        self._outage = False
        # When the last successful poll ended; nothing is trusted before the first one has
        # fixed the feed's position.
        self._last_ok = float("-inf")
        # A poll cut off by the timeout that is still ending (its connection's cleanup waits
        # on the silent link too): polls wait for it rather than open a connection each.
        self._abandoned: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._reset_listeners: list[ResetListener] = []
        self._resetting = False
        # Set by a change notification (PostgreSQL): the next poll starts at once.
        self.wake = asyncio.Event()

    @property
    def store_timeout(self) -> float:
        """Seconds one store call may take (well under the outage grace); lookups should use it too."""
        return self._timeout

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every batch of changes (e.g. the CORS origin index)."""
        self._listeners.append(listener)

    def subscribe_reset(self, listener: ResetListener) -> None:
        """Await `listener` when the feed fell behind retention and everything must be read again."""
        self._reset_listeners.append(listener)

    def trusted(self) -> bool:
        """Whether cached identities may still be served: the last successful poll is recent enough."""
        age = self._clock() - self._last_ok
        return age <= self._grace or (not self._outage and age <= self._cadence)

    @property
    def healthy(self) -> bool:
        """Whether the store answers the feed: the last poll succeeded and the next one is not overdue."""
        return not self._outage and not self._resetting and self._clock() - self._last_ok <= self._cadence

    async def poll(self) -> None:
        """Read and apply every change since the last poll, within the store timeout; never raises
        StoreUnavailable."""
        task: asyncio.Task[None] | None = None
        try:
            if self._abandoned is not None:
                done, _ = await asyncio.wait((self._abandoned,), timeout=self._timeout)
                if not done:
                    self._failed(f"no answer within {self._timeout:g}s")
                    return
                self._abandoned = None
            task = asyncio.create_task(self._read())
            task.add_done_callback(retrieve_exception)
            done, _ = await asyncio.wait((task,), timeout=self._timeout)
        except asyncio.CancelledError:
            # Shutting down, and the store is closed next: its calls under way must end first,
            # or a connection outlives its pool.
            ending = [read for read in (task, self._abandoned) if read is not None]
            for read in ending:
                read.cancel()
            if ending:
                await asyncio.wait(ending)
            raise
        if not done:
            # Not awaited: the store call ends in the background while the feed carries on.
            task.cancel()
            self._abandoned = task
            self._failed(f"no answer within {self._timeout:g}s")
            return
        try:
            task.result()
        except StoreUnavailable:
            self._failed("the store cannot be reached")
            return
        if self._outage:
            log.warning("store reachable again: change feed at position %s", self._cursor)
        self._outage = False
        self._last_ok = self._clock()

    async def _read(self) -> None:
        if self._cursor is None:
            # First contact: nothing cached yet, so only the position matters.
            self._cursor = await self._store.latest_change()
            return
        while True:
            horizon, changes = await self._store.feed_since(self._cursor, limit=_BATCH)
            if horizon > self._cursor:
                await self._reset(horizon)
                return
            if changes:
                self._apply(changes)
            if len(changes) < _BATCH:
                return

    async def _reset(self, horizon: int) -> None:
        """Retention removed changes this instance never read: forget everything cached."""
        log.warning(
            "change feed fell behind retention: dropping every cached identity and reading again",
            extra={"cursor": self._cursor, "horizon": horizon},
        )
        self._resetting = True
        try:
            latest = await self._store.latest_change()
            self._cache.clear()
            for listener in self._reset_listeners:
                await listener()
            # Only now: a reset cut short is done again by the next poll.
            self._cursor = latest
        finally:
            self._resetting = False

    def _failed(self, why: str) -> None:
        if not self._outage:
            self._outage = True
            log.error("store unreachable (%s): serving cached identities for at most %gs", why, self._grace)

    def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            self._cache.evict_user(change.user)
        self._cursor = changes[-1].id
        for listener in self._listeners:
            listener(changes)

    async def run(self) -> None:
        """Poll forever (a background task of the server): every `interval`, or at once when woken."""
        while True:
            # Cleared before the read: a notification during it means one more poll right after.
            self.wake.clear()
            try:
                await self.poll()
            except Exception:
                # A dead feed would refuse every cached identity after the grace: keep polling.
                log.exception("change feed poll failed; polling again")
            # Not wait_for: on 3.11 it can swallow a cancel that races the event, and close() hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self.wake.wait()
