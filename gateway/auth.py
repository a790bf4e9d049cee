"""Authentication: bearer token → Principal, through a TTL cache in front of the store.

Imports: errors, tokens, store, cachetools.

Only identities are cached (keyed by the token's SHA-256, never the token), never
decisions. Check order is cheapest first: header shape, token format and checksum
(no store query for garbage), the positive cache, the negative cache of unknown
well-formed tokens (so junk can neither flood the store nor evict valid entries),
then the store.

Store lookups are bounded twice (README "Freshness, outages and several instances"): each
caller waits at most `store_timeout` for an answer, even when the store stops answering
silently, and at most `max_lookups` run at once per process, with a short queue behind
them; past that a lookup is refused at once (503 with Retry-After), so well-formed junk
tokens cannot pile work onto the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from cachetools import TTLCache

from gateway import tokens
from gateway.errors import BadRequest, Refusal, StoreUnavailable, Unauthenticated
from gateway.store import Principal, Store

Clock = Callable[[], float]
Fetch = Callable[[], Awaitable[Principal | None]]  # one store read of an identity

# One store call may take half the outage grace, within these limits: long enough for a
# cold connection on a loaded machine (a healthy lookup takes about a millisecond), and
# short enough that a silent store costs a request seconds, not the driver's own timeout.
MIN_STORE_TIMEOUT = 0.5
MAX_STORE_TIMEOUT = 2.0
# The store's connection pool holds 15 connections (SQLAlchemy's 5 + 10 overflow): lookups
# get at most 10 of them, so the change feed and the admin API always find one free.
MAX_LOOKUPS = 10
MAX_QUEUED_LOOKUPS = 50

_UNREACHABLE = "the store cannot be reached; try again shortly"
_SLOW = "the store did not answer in time; try again shortly"
_BUSY = "too many token lookups in progress; try again shortly"


def store_call_timeout(outage_grace: float) -> float:
    """How long one store call may take before it counts as failed: well under `outage_grace`."""
    return min(max(outage_grace / 2, MIN_STORE_TIMEOUT), MAX_STORE_TIMEOUT)


class LookupsBusy(StoreUnavailable):
    """Every store lookup slot and queue place of this process is taken (503, Retry-After)."""

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class TokenCache:
    """Identities by token digest, with eviction by user or token (the change feed's needs)."""

    def __init__(
        self, *, ttl: float, negative_ttl: float, max_entries: int, timer: Clock = time.monotonic
    ) -> None:
        self._known: TTLCache[str, Principal] = TTLCache(maxsize=max(1, max_entries), ttl=ttl, timer=timer)
        self._unknown: TTLCache[str, bool] = TTLCache(
            maxsize=max(1, min(max_entries, 10_000)), ttl=max(negative_ttl, 0.001), timer=timer
        )
        self._negative_enabled = negative_ttl > 0
        self._by_user: dict[str, set[str]] = {}
        # Bumped on every eviction: a lookup that raced an eviction must not cache its answer.
        self.generation = 0

    def get(self, digest: str) -> Principal | None:
        """The cached identity for `digest`, if fresh."""
        return self._known.get(digest)

    def is_unknown(self, digest: str) -> bool:
        """True when `digest` was looked up recently and the store did not know it."""
        return digest in self._unknown

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Cache `principal` unless an eviction happened since `generation` was read."""
        if generation != self.generation:
            return
        self._known[digest] = principal
        self._by_user.setdefault(principal.user, set()).add(digest)

    def put_unknown(self, digest: str, generation: int) -> None:
        """Remember briefly that the store does not know `digest`."""
        if self._negative_enabled and generation == self.generation:
            self._unknown[digest] = True

    def evict_user(self, user: str) -> None:
        """Forget every identity of `user` (any of its tokens)."""
        self.generation += 1
        for digest in self._by_user.pop(user, ()):
            self._known.pop(digest, None)

    def clear(self) -> None:
        """Forget every identity, known and unknown (the change feed lost track)."""
        self.generation += 1
        self._known.clear()
        self._unknown.clear()
        self._by_user.clear()

    def __len__(self) -> int:
        return len(self._known)


class LastUsed:
    """Collects token use in memory; `flush` writes it in one batch (not a change)."""

    def __init__(self) -> None:
        self._seen: dict[str, datetime] = {}
        self._written: dict[str, float] = {}

    def touch(self, token_id: str, now: float) -> None:
        """Note that `token_id` was used at wall-clock `now` (cheap; called per request)."""
        # Written at most every 30 s per token: last_used_at is allowed to be a minute stale.
        if now - self._written.get(token_id, 0.0) >= 30.0:
            self._written[token_id] = now
            self._seen[token_id] = datetime.fromtimestamp(now, UTC)

    async def flush(self, store: Store, *, keys: bool = False) -> None:
        """Write what was collected since the last flush (of API keys, with `keys`)."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        await store.record_last_used(seen, keys=keys)


class Authenticator:
    """Turns an Authorization header into a Principal or a 401/503 refusal."""

    def __init__(
        self,
        store: Store,
        cache: TokenCache,
        last_used: LastUsed,
        *,
        store_trusted: Callable[[], bool],
        wall_clock: Clock = time.time,
        store_timeout: float = MAX_STORE_TIMEOUT,
        max_lookups: int = MAX_LOOKUPS,
        max_queued_lookups: int = MAX_QUEUED_LOOKUPS,
    ) -> None:
        self._store = store
        self._cache = cache
        self._last_used = last_used
        self._store_trusted = store_trusted
        self._wall_clock = wall_clock
        self.store_timeout = store_timeout
        """Seconds a request waits at most for its token's store lookup (then 503)."""
        self.max_lookups = max(1, max_lookups)
        """Store lookups running at once, at most (shared lookups of one token count once)."""
        self.max_queued_lookups = max(0, max_queued_lookups)
        """Lookups waiting for a free slot, at most; beyond that 503 with Retry-After."""
        # The lookup under way per digest, with the cache generation it started in: concurrent
        # requests for that token share it, unless an eviction came in between.
        self._inflight: dict[str, tuple[int, asyncio.Task[Principal | None]]] = {}
        self._running = 0  # lookups holding a slot, until their store call has fully ended
        self._lookups: set[asyncio.Task[Principal | None]] = set()  # every one not yet ended
        self._queue: deque[asyncio.Future[None]] = deque()
        self.cache_hits = 0
        self.cache_misses = 0

    async def close(self) -> None:
        """Wait until the store lookups under way have ended (before the store is closed)."""
        if self._lookups:
            await asyncio.wait(self._lookups)

    async def authenticate(self, authorization: list[str], *, touch: bool = True) -> Principal:
        """The Principal for the request's Authorization header values (all of them): `gw_`
        tokens only (the admin listener's credential check).

        `touch=False` (explain) leaves `last_used_at` alone."""
        return await self.authenticate_token(bearer_token(authorization), touch=touch)

    async def authenticate_token(self, token: str, *, touch: bool = True) -> Principal:
        """The Principal of a `gw_` bearer token, or a 401/503 refusal."""
        digest = tokens.digest(token)
        principal = self._cache.get(digest)
        if principal is None and not tokens.is_well_formed(token):
            # Checked only on a cache miss: a cached digest came from a well-formed token.
            raise Unauthenticated(
                Refusal.INVALID_TOKEN, "the token is malformed (check that it was copied whole)"
            )
        if principal is not None:
            self.cache_hits += 1
            if not self._store_trusted():
                # Outage longer than cache.outage_grace: cached identities may be revoked by now.
                raise StoreUnavailable(_UNREACHABLE)
        else:
            self.cache_misses += 1
            principal = await self._lookup(digest, lambda: self._store.lookup_token(digest))
        now = self._wall_clock()
        check_state(principal, now)
        if touch:
            self._last_used.touch(principal.token_id, now)
        return principal

    def peek(self, key: str) -> Principal | None:
        """The Principal cached under `key`, if any (no store query; 503 past the outage grace)."""
        principal = self._cache.get(key)
        if principal is not None and not self._store_trusted():
            raise StoreUnavailable(_UNREACHABLE)
        return principal

    async def cached(self, key: str, fetch: Fetch) -> Principal:
        """The Principal cached under `key`, else the one `fetch()` reads from the store (bounded
        like token lookups, evicted by the change feed like them); 401 when it finds none."""
        principal = self._cache.get(key)
        if principal is None:
            return await self._lookup(key, fetch)
        if not self._store_trusted():
            raise StoreUnavailable(_UNREACHABLE)
        return principal

    async def _lookup(self, digest: str, fetch: Fetch) -> Principal:
        if not self._store_trusted():
            # The feed has lost the store: a token not held gets 503 at once, not a query that hangs.
            raise StoreUnavailable(_UNREACHABLE)
        if self._cache.is_unknown(digest):
            raise _unknown_token()
        pending = self._inflight.get(digest)
        if pending is not None and pending[0] == self._cache.generation:
            task = pending[1]
        else:
            # None under way, or it may have read the store before a change this request must see.
            task = self._start(digest, fetch)
        # Wait on the task, not inside the store call: a cancelled store call finishes its
        # connection's cleanup before it returns, which on a silent link takes the driver's timeout.
        done, _ = await asyncio.wait((task,), timeout=self.store_timeout)
        if not done:
            raise StoreUnavailable(_SLOW)
        found = task.result()
        if found is None:
            raise _unknown_token()
        return found

    def _start(self, digest: str, fetch: Fetch) -> asyncio.Task[Principal | None]:
        """Start the store lookup of `digest`, or refuse it when every slot and queue place is taken."""
        slot: asyncio.Future[None] | None = None
        if self._running < self.max_lookups:
            self._running += 1
        elif len(self._queue) < self.max_queued_lookups:
            slot = asyncio.get_running_loop().create_future()
            self._queue.append(slot)
        else:
            raise LookupsBusy(_BUSY)
        # Read before the query: an eviction while it runs makes its answer stale (TokenCache.put).
        generation = self._cache.generation
        task = asyncio.ensure_future(self._query(digest, fetch, generation, slot))
        task.add_done_callback(retrieve_exception)
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        self._inflight[digest] = (generation, task)
        return task

    async def _query(
        self, digest: str, fetch: Fetch, generation: int, slot: asyncio.Future[None] | None
    ) -> Principal | None:
        deadline = asyncio.get_running_loop().time() + self.store_timeout
        holding = slot is None
        try:
            if slot is not None:
                try:
                    # Half the bound at most: a lookup that gets its slot late still has time to run.
                    async with asyncio.timeout(self.store_timeout / 2):
                        await slot
                except TimeoutError:
                    raise LookupsBusy(_BUSY) from None
                finally:
                    # Handed over by _release_slot even when this task was cancelled meanwhile.
                    holding = slot.done() and not slot.cancelled()
            try:
                async with asyncio.timeout_at(deadline):
                    found = await fetch()
            except TimeoutError:
                raise StoreUnavailable(_SLOW) from None
        finally:
            pending = self._inflight.get(digest)
            if pending is not None and pending[1] is asyncio.current_task():
                del self._inflight[digest]  # a later lookup of this digest may have replaced it
            if holding:
                self._release_slot()
            elif slot is not None:
                slot.cancel()
                with contextlib.suppress(ValueError):
                    self._queue.remove(slot)
        if found is None:
            self._cache.put_unknown(digest, generation)
        else:
            self._cache.put(digest, found, generation)
        return found

    def _release_slot(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the oldest waiting lookup
                return
        self._running -= 1


def bearer_token(authorization: list[str]) -> str:
    """The credential of the request's Authorization header values, or a 400/401 refusal."""
    if not authorization:
        raise Unauthenticated(Refusal.MISSING_TOKEN, "no bearer token: send 'Authorization: Bearer gw_…'")
    if len(authorization) > 1:
        raise BadRequest("more than one Authorization header")
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated(Refusal.INVALID_TOKEN, "the Authorization scheme must be Bearer")
    return token.strip()


def retrieve_exception(task: asyncio.Task[object]) -> None:
    """Done callback of a store task whose waiters may all have given up: no "never retrieved" noise."""
    if not task.cancelled():
        task.exception()


def _unknown_token() -> Unauthenticated:
    return Unauthenticated(Refusal.INVALID_TOKEN, "the token is not valid (unknown, deleted or reset)")


def check_state(principal: Principal, now: float) -> None:
    """Refuse (401) an expired token or a disabled user."""
    expires_at = principal.expires_at
    if expires_at is not None and expires_at.timestamp() <= now:
        stamp = expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise Unauthenticated(Refusal.TOKEN_EXPIRED, f"token '{principal.token_name}' expired on {stamp}")
    if principal.disabled:
        raise Unauthenticated(Refusal.USER_DISABLED, f"user '{principal.user}' is disabled")
