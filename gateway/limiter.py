"""Rate limits at run time: where the counters live and the checks the decision runs.

Imports: ratelimit (the GCRA), redis_client, config, errors, metrics, store.

Two stores keep each key's GCRA state (README "Rate limits"): `MemoryStore`, one
process's dict (each process counts alone), and `RedisStore`, one Lua script per request
that decides every key of the request at once on the Redis server's clock, so every
instance and worker shares one counter per key. Either way a request is checked against
all its keys together and consumes from none unless all admit it.

`RateLimiter` lives on the Gateway (it outlives reloads: counters are keyed by user,
route and address, never by the limit, so a reload that changes a limit keeps them).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from gateway.config import RateLimitConfig
from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.metrics import Metrics
from gateway.ratelimit import (
    Limit,
    RateHeaders,
    Verdict,
    decide,
    limit_item,
    limit_template,
    policy_item,
    retry_after_header,
)
from gateway.redis_client import RedisClient, RedisFailure
from gateway.store import Principal

log = logging.getLogger("gateway.limiter")
T = TypeVar("T")

STORE_TIMEOUT = 0.25  # seconds a request waits for Redis before on_store_error decides
_RETRY_DOWN = 0.5  # seconds between attempts while Redis is down (requests meanwhile skip it)
KEY_PREFIX = "gateway:rl:"
_MAX_PLANS = 4096  # (user, route) pairs whose checks are kept built; all dropped when full


class Check(NamedTuple):
    """One limit a request is checked against: its policy name in the headers, key and limit."""

    policy: str  # "user", "route" or "auth"
    key: str
    limit: Limit


Step = tuple[str, float, float]
"""A check as the memory store's fast path reads it: key, emission interval, burst tolerance."""


class Plan:
    """One user's checks on one route and their headers' constant parts, built once per pair.

    Every request of the pair would otherwise build the same keys, `Check`s and
    `RateLimit-Policy` value again; the limits it was built from tell when it is stale.
    """

    __slots__ = ("user_limit", "route_limit", "checks", "steps", "policy", "state")

    def __init__(self, user: str, route: str, user_limit: Limit | None, route_limit: Limit | None) -> None:
        self.user_limit = user_limit
        self.route_limit = route_limit
        checks: list[Check] = []
        if user_limit is not None:
            checks.append(Check("user", "u:" + user, user_limit))
        if route_limit is not None:
            checks.append(Check("route", f"r:{route}:{user}", route_limit))
        self.checks = tuple(checks)
        self.steps: tuple[Step, ...] = tuple(
            (check.key, check.limit.interval, check.limit.tolerance) for check in checks
        )
        self.policy = ("RateLimit-Policy", ", ".join(policy_item(c.policy, c.limit) for c in checks))
        # The `RateLimit` value with a %d for each check's requests left and seconds to wait.
        self.state = ", ".join(limit_template(check.policy) for check in checks)

    def fits(self, user_limit: Limit | None, route_limit: Limit | None) -> bool:
        """Whether the plan was built from these limits (the same objects, or equal ones)."""
        mine, theirs = self.user_limit, self.route_limit
        return (mine is user_limit or mine == user_limit) and (theirs is route_limit or theirs == route_limit)


class StoreFailed(Exception):
    """The rate-limit store could not answer in time (the message never holds the URL)."""


class LimitStore(Protocol):
    """Keeps the GCRA state of every key; `apply` is atomic across the keys of one call."""

    async def apply(self, checks: Sequence[Check], consume: bool) -> list[Verdict]:
        """Each check's verdict; with `consume`, commit all of them only if all are allowed."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryStore:
    """One process's counters: a dict of theoretical arrival times on the monotonic clock."""

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._sweep_at = 4096  # size at which idle keys are dropped (doubles with what stays)

    async def apply(self, checks: Sequence[Check], consume: bool) -> list[Verdict]:
        """Each check's verdict; one event-loop step, so atomic without a lock."""
        return self.apply_now(checks, consume, time.monotonic())

    def idle(self, key: str) -> bool:
        """Whether `key` has nothing counted (never seen, or earned everything back)."""
        tat = self._tats.get(key)
        return tat is None or tat <= time.monotonic()

    def apply_now(self, checks: Sequence[Check], consume: bool, now: float) -> list[Verdict]:
        """`apply` at `now` (seconds on the monotonic clock)."""
        tats = self._tats
        verdicts = [decide(check.limit, tats.get(check.key), now) for check in checks]
        if all(verdict.allowed for verdict in verdicts):
            if consume:
                for check, verdict in zip(checks, verdicts, strict=True):
                    tats[check.key] = verdict.tat
                if len(tats) >= self._sweep_at:
                    self._sweep(now)
            return verdicts
        for check, verdict in zip(checks, verdicts, strict=True):
            if not verdict.allowed and verdict.tat < tats.get(check.key, verdict.tat):
                tats[check.key] = verdict.tat  # decide's clamp of another limit's debt, kept to refill
        return verdicts

    def consume(self, steps: Sequence[Step], now: float) -> tuple[int, ...] | None:
        """`apply_now(checks, True, now)` when every check admits, without a Verdict per check:
        each check's requests left and whole seconds until one more, in order, flat. None, with
        nothing changed, when one would refuse (then `apply_now` gives the verdicts).

        The same arithmetic as gateway.ratelimit.decide's admission (kept equal by a test).
        """
        tats = self._tats
        counts: tuple[int, ...] = ()
        new_tats = {}
        for key, interval, tolerance in steps:
            tat = tats.get(key, now)
            if tat < now:
                tat = now
            elif tat > now + tolerance:
                tat = now + tolerance  # decide's clamp of a stricter limit's debt
            new_tat = tat + interval
            if now < new_tat - tolerance:
                return None
            left = math.floor((now + tolerance - new_tat) / interval + 1e-9)
            if left > 0:
                counts += (left, 0)
            else:
                wait = new_tat - tolerance + interval - now
                counts += (0, math.ceil(wait) if wait > 0.0 else 0)
            new_tats[key] = new_tat
        tats.update(new_tats)  # all or nothing, as apply_now
        if len(tats) >= self._sweep_at:
            self._sweep(now)
        return counts

    def _sweep(self, now: float) -> None:
        # A key whose TAT has passed is the same as a key never seen: drop it.
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        self._sweep_at = max(4096, 2 * len(self._tats))

    async def close(self) -> None:
        """Nothing to release."""


# KEYS: the keys. ARGV[1]: 1 to consume, 0 to look only; then per key its emission interval
# and burst tolerance in microseconds. The same GCRA as gateway.ratelimit.decide, on the
# server's clock so every instance agrees. Returns per key: allowed (0/1), requests left,
# microseconds until one more.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out, tats, all = {}, {}, true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local stored = redis.call('GET', KEYS[i])
  local tat = now
  if stored then
    tat = math.max(tonumber(stored), now)
    if tat > now + tolerance then
      -- Counted under a stricter limit: an empty bucket of this one, kept so it refills.
      tat = now + tolerance
      redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil(tolerance / 1000) + 1)
    end
  end
  local new_tat = tat + interval
  local allowed_from = new_tat - tolerance
  if now < allowed_from then
    all = false
    out[#out + 1] = 0
    out[#out + 1] = math.max(0, math.floor((now + tolerance - tat) / interval))
    out[#out + 1] = allowed_from - now
  else
    local left = math.max(0, math.floor((now + tolerance - new_tat) / interval))
    local wait = 0
    if left == 0 then wait = math.max(0, new_tat - tolerance + interval - now) end
    out[#out + 1] = 1
    out[#out + 1] = left
    out[#out + 1] = wait
  end
  tats[i] = new_tat
end
if ARGV[1] == '1' and all then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%d', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1)
  end
end
return out
"""
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()  # noqa: S324 -- Redis names scripts by SHA-1


class RedisStore:
    """Counters shared through Redis: one script call (one round trip) per request."""

    def __init__(self, url: str, *, timeout: float = STORE_TIMEOUT) -> None:
        self._client = RedisClient(url, timeout=timeout)
        self._timeout = timeout

    async def apply(self, checks: Sequence[Check], consume: bool) -> list[Verdict]:
        """Each check's verdict, decided and (with `consume`) committed on the server in one step."""
        args: list[bytes | str | int] = [len(checks)]
        args.extend(KEY_PREFIX + check.key for check in checks)
        args.append(1 if consume else 0)
        for check in checks:
            interval = round(check.limit.interval * 1_000_000)  # ≥ 1: limit_problems sees to it
            args.append(interval)
            args.append(interval * check.limit.burst)
        deadline = time.monotonic() + self._timeout  # one bound for both calls below
        try:
            try:
                raw = await self._client.call("EVALSHA", _SCRIPT_SHA, *args)
            except RedisFailure as exc:
                if "NOSCRIPT" not in str(exc):
                    raise
                # Redis restarted or its script cache was flushed: EVAL loads it again.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                raw = await self._client.call("EVAL", _SCRIPT, *args, timeout=left)
        except RedisFailure as exc:
            raise StoreFailed(str(exc)) from None
        if not isinstance(raw, list) or len(raw) != 3 * len(checks):
            raise StoreFailed("Redis answered the rate-limit script with something else")
        verdicts = []
        for index in range(0, len(raw), 3):
            allowed, left, wait = raw[index], raw[index + 1], raw[index + 2]
            # The TAT stays on the server; the verdict carries what the headers need.
            verdicts.append(Verdict(bool(allowed), int(left), int(wait) / 1_000_000, 0.0))
        return verdicts

    async def close(self) -> None:
        """Close the connection."""
        await self._client.close()


def display_url(url: str) -> str:
    """`url` with its password replaced by `***`, for logs."""
    if url == "memory":
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def open_limit_store(url: str) -> LimitStore:
    """The store a `rate_limits.store` value names (already validated by the config)."""
    return MemoryStore() if url == "memory" else RedisStore(url)


class RateLimiter:
    """The rate-limit steps of the decision (README "Rate limits"), on one store per process."""

    def __init__(self, config: RateLimitConfig, metrics: Metrics) -> None:
        self.url = config.store
        self.store = open_limit_store(config.store)
        # The memory store answers at once: called directly, without a coroutine per check.
        self._memory = self.store if isinstance(self.store, MemoryStore) else None
        self._metrics = metrics
        self._policies: dict[tuple[tuple[str, Limit], ...], str] = {}
        self._plans: dict[tuple[str, str], Plan] = {}  # by (user, route)
        self._fallback = MemoryStore()  # failed credential checks while the store is down
        # Credential checks in flight: client address → credential → requests checking it.
        self._checking: dict[str, dict[str, int]] = {}
        self._down = False  # the store failed and has not answered since
        self._retry_at = 0.0  # monotonic time of the next attempt while down

    async def guard(
        self, config: RateLimitConfig, address: str, credential: str, check: Callable[[], Awaitable[T]]
    ) -> T:
        """`check()` of `credential` under `auth_failures`: an address over it gets 429 before its
        credential is looked at (so guessing never reaches the store), and a refusal that
        `guessed` counts one failure.

        Different credentials of the address still being checked count against it too: else a
        guesser with a thousand requests open at once would pass a thousand times before its
        first 401. (Many requests with one credential, a client's usual concurrency, count once.)
        """
        limit = config.auth_failures
        if limit is None:
            return await check()
        checking = self._checking.get(address)
        if checking is None:
            checking = self._checking[address] = {credential: 1}
        else:
            checking[credential] = checking.get(credential, 0) + 1
        try:
            memory = self._memory
            if memory is None or len(checking) > limit.burst or not memory.idle("a:" + address):
                # Not the usual case (nothing counted, little in flight): ask the store.
                await self._check_address(config, limit, address, len(checking))
            return await check()
        except GatewayError as error:
            if error.guessed:
                error.extra_headers = await self.failed(config, address)
            raise
        finally:
            left = checking.pop(credential) - 1
            if left:
                checking[credential] = left
            elif not checking:
                del self._checking[address]

    async def _check_address(
        self, config: RateLimitConfig, limit: Limit, address: str, in_flight: int
    ) -> None:
        """429 unless `address` has room for `in_flight` more failures (this request's included)."""
        check = Check("auth", "a:" + address, limit)
        verdicts = await self._apply(config, (check,), consume=False)
        if verdicts is None:
            return
        verdict = verdicts[0]
        if verdict.allowed and verdict.remaining + 1 >= in_flight:
            return
        if verdict.allowed:
            # Full only with the checks in flight: one more may come once they have ended.
            verdict = verdict._replace(allowed=False, remaining=0, retry_after=1.0)
        raise RateLimited(
            "too many failed credential checks from this address; try again later",
            self._headers((check,), (verdict,), refused=verdict),
        )

    async def failed(self, config: RateLimitConfig, address: str) -> RateHeaders:
        """Count one failed credential check of `address`; the headers for its refusal."""
        limit = config.auth_failures
        if limit is None:
            return ()
        check = Check("auth", "a:" + address, limit)
        verdicts = await self._apply(config, (check,), consume=True)
        return () if verdicts is None else self._headers((check,), verdicts)

    async def admit(
        self, config: RateLimitConfig, principal: Principal, route: str, route_limit: Limit | None
    ) -> RateHeaders:
        """Count one request of `principal` on `route`, or refuse it (429) consuming nothing."""
        headers = self.admit_now(config, principal, route, route_limit)
        if headers is not None:
            return headers
        user_limit = principal.rate_limit or config.per_user
        if user_limit is None and route_limit is None:
            return ()
        plan = self._plan(principal.user, route, user_limit, route_limit)
        verdicts = await self._apply(config, plan.checks, consume=True)
        return () if verdicts is None else self._admitted(plan, verdicts)

    def admit_now(
        self, config: RateLimitConfig, principal: Principal, route: str, route_limit: Limit | None
    ) -> RateHeaders | None:
        """`admit` on the memory store, without a coroutine; None when the store is Redis (await `admit`)."""
        memory = self._memory
        if memory is None:
            return None
        user_limit = principal.rate_limit or config.per_user
        if user_limit is None and route_limit is None:
            return ()
        # `_plan`'s usual case inlined: the very limit objects of the last request of the pair.
        plan = self._plans.get((principal.user, route))
        if plan is None or plan.user_limit is not user_limit or plan.route_limit is not route_limit:
            plan = self._plan(principal.user, route, user_limit, route_limit)
        now = time.monotonic()
        counts = memory.consume(plan.steps, now)
        if counts is not None:
            return (plan.policy, ("RateLimit", plan.state % counts))
        # Some check refuses (consume changed nothing): the verdicts, for the 429's headers.
        return self._admitted(plan, memory.apply_now(plan.checks, True, now))

    def _plan(self, user: str, route: str, user_limit: Limit | None, route_limit: Limit | None) -> Plan:
        """The checks of `user` on `route`, built again when a limit changed (a reload, the user's own)."""
        plan = self._plans.get((user, route))
        if plan is not None and plan.fits(user_limit, route_limit):
            # Equal limits in new objects (a reload, a principal read again, another token of
            # the user): the next request finds them by identity.
            plan.user_limit, plan.route_limit = user_limit, route_limit
            return plan
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        plan = self._plans[user, route] = Plan(user, route, user_limit, route_limit)
        return plan

    def _admitted(self, plan: Plan, verdicts: Sequence[Verdict]) -> RateHeaders:
        """The headers of an admitted request; RateLimited when one of `verdicts` refuses it."""
        refused = [verdict for verdict in verdicts if not verdict.allowed]
        if refused:
            worst = max(refused, key=lambda verdict: verdict.retry_after)
            raise RateLimited(
                "rate limit reached; try again later",
                self._headers(plan.checks, verdicts, refused=worst, policy=plan.policy[1]),
            )
        return self._headers(plan.checks, verdicts, policy=plan.policy[1])

    async def _apply(
        self, config: RateLimitConfig, checks: Sequence[Check], *, consume: bool
    ) -> list[Verdict] | None:
        """The store's verdicts; None when it failed and `on_store_error: allow` lets the request on.

        Failed credential checks are counted in this process's memory while the store is down:
        guessing must not become unlimited (allow) nor lock everybody out (deny) in an outage.
        """
        if self._memory is not None:
            return self._memory.apply_now(checks, consume, time.monotonic())
        now = time.monotonic()
        try:
            if self._down and now < self._retry_at:
                raise StoreFailed("still down")
            verdicts = await self.store.apply(checks, consume)
        except StoreFailed as exc:
            self._metrics.rate_limit_store_errors.inc()
            if not self._down:
                self._down = True
                log.error(
                    "rate-limit store unreachable; requests are %s until it answers",
                    "allowed" if config.on_store_error == "allow" else "refused",
                    extra={"store": display_url(self.url), "error": str(exc)},
                )
            if self._retry_at <= now:
                self._retry_at = now + _RETRY_DOWN
            if checks[0].policy == "auth":
                return self._fallback.apply_now(checks, consume, now)
            if config.on_store_error == "allow":
                return None
            raise StoreUnavailable("the rate-limit store cannot be reached") from exc
        if self._down:
            self._down = False
            log.warning("rate-limit store reachable again", extra={"store": display_url(self.url)})
        return verdicts

    def _headers(
        self,
        checks: Sequence[Check],
        verdicts: Sequence[Verdict],
        *,
        refused: Verdict | None = None,
        policy: str | None = None,
    ) -> RateHeaders:
        if policy is None:
            policy = self._policy(checks)
        if refused is not None:
            # Nothing was consumed: a key that would have admitted still has this request's share.
            verdicts = [
                v._replace(remaining=v.remaining + 1, retry_after=0.0) if v.allowed else v for v in verdicts
            ]
        state = limit_item(checks[0].policy, verdicts[0])
        for index in range(1, len(checks)):
            state += ", " + limit_item(checks[index].policy, verdicts[index])
        headers: RateHeaders = (("RateLimit-Policy", policy), ("RateLimit", state))
        if refused is not None:
            headers += (("Retry-After", retry_after_header(refused.retry_after)),)
        return headers

    def _policy(self, checks: Sequence[Check]) -> str:
        """The `RateLimit-Policy` value for `checks`, built once per set of limits."""
        key = tuple((check.policy, check.limit) for check in checks)
        policy = self._policies.get(key)
        if policy is None:
            policy = ", ".join(policy_item(name, limit) for name, limit in key)
            if len(self._policies) >= 1024:
                self._policies.clear()
            self._policies[key] = policy
        return policy

    def reconfigure(self, config: RateLimitConfig) -> None:
        """A reload: the limits come with each request's settings; the store stays until a restart."""
        if config.store != self.url:
            log.warning("rate_limits.store changed: it takes effect only after a restart")

    async def close(self) -> None:
        """Close the store's connections."""
        await self.store.close()
