"""Authentication: bearer token → Principal, through a TTL cache in front of the store.

Imports: errors, tokens, store, cachetools.

Only identities are cached (keyed by the token's SHA-256, never the token), never
decisions. Check order is cheapest first: header shape, token format and checksum
(no store query for garbage), the positive cache, the negative cache of unknown
well-formed tokens (so junk can neither flood the store nor evict valid entries),
then the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cachetools import TTLCache

from gateway import tokens
from gateway.errors import BadRequest, Refusal, StoreUnavailable, Unauthenticated
from gateway.store import Principal, Store

Clock = Callable[[], float]


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

    async def flush(self, store: Store) -> None:
        """Write what was collected since the last flush."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        await store.record_last_used(seen)


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
    ) -> None:
        self._store = store
        self._cache = cache
        self._last_used = last_used
        self._store_trusted = store_trusted
        self._wall_clock = wall_clock
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    async def authenticate(self, authorization: list[str]) -> Principal:
        """The Principal for the request's Authorization header values (all of them)."""
        if not authorization:
            raise Unauthenticated(Refusal.MISSING_TOKEN, "no bearer token: send 'Authorization: Bearer gw_…'")
        if len(authorization) > 1:
            raise BadRequest("more than one Authorization header")
        scheme, _, token = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated(Refusal.INVALID_TOKEN, "the Authorization scheme must be Bearer")
        token = token.strip()
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
                raise StoreUnavailable("the store cannot be reached; try again shortly")
        else:
            self.cache_misses += 1
            principal = await self._lookup(digest)
        now = self._wall_clock()
        _check_state(principal, now)
        self._last_used.touch(principal.token_id, now)
        return principal

    async def _lookup(self, digest: str) -> Principal:
        if self._cache.is_unknown(digest) and self._store_trusted():
            raise _unknown_token()
        pending = self._inflight.get(digest)
        if pending is not None:
            # Another request is already asking the store for this token: share its answer.
            found = await asyncio.shield(pending)
        else:
            found = await self._query(digest)
        if found is None:
            raise _unknown_token()
        return found

    async def _query(self, digest: str) -> Principal | None:
        generation = self._cache.generation
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            found = await self._store.lookup_token(digest)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(found)
        finally:
            del self._inflight[digest]
        if found is None:
            self._cache.put_unknown(digest, generation)
        else:
            self._cache.put(digest, found, generation)
        return found


def _unknown_token() -> Unauthenticated:
    return Unauthenticated(Refusal.INVALID_TOKEN, "the token is not valid (unknown, deleted or reset)")


def _check_state(principal: Principal, now: float) -> None:
    expires_at = principal.expires_at
    if expires_at is not None and expires_at.timestamp() <= now:
        stamp = expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise Unauthenticated(Refusal.TOKEN_EXPIRED, f"token '{principal.token_name}' expired on {stamp}")
    if principal.disabled:
        raise Unauthenticated(Refusal.USER_DISABLED, f"user '{principal.user}' is disabled")
