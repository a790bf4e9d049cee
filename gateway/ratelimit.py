"""Rate limits: the GCRA decision and the headers it answers with (README "Rate limits", issue 13).

Imports: nothing of the gateway. Pure: a limit, a key's stored state and the time in; a verdict
and the new state out. The stores (one process's memory; Redis shared by every instance)
keep the state and apply it atomically; the decision function decides where a limit is
checked.

GCRA (the generic cell rate algorithm) keeps one number per key: the theoretical arrival
time (TAT) of the next request if the key sent exactly at its rate. A request is admitted
when it arrives no earlier than TAT minus the burst tolerance; admitting it moves TAT on
by one emission interval. A refused request consumes nothing (the one change it may bring is
a TAT left by a stricter limit clamped to this limit's empty bucket), and the state is one
float, so a store can apply it atomically in one step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

RateHeaders = tuple[tuple[str, str], ...]
"""`RateLimit-Policy` and `RateLimit` (and on a refusal `Retry-After`) header lines for one answer."""

PERIOD_PATTERN = r"^([0-9]+(?:\.[0-9]+)?)?([smh])$"  # also the OpenAPI document's
_PERIOD_RE = re.compile(PERIOD_PATTERN)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_COUNT = 1_000_000_000  # the largest rate and burst
_MAX_PERIOD = 86400.0
_MIN_INTERVAL = 1e-6  # seconds between two requests at the steady rate
_SPEC_RE = re.compile(r"^([0-9]+)/([^:]+)(?::([0-9]+))?$")


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` requests per `per` seconds, up to `burst` at once (from idle)."""

    rate: float
    per: float
    burst: int
    # Derived once (a limit is checked on every request): not compared, not shown.
    interval: float = field(init=False, repr=False, compare=False)  # seconds between two at the rate
    tolerance: float = field(init=False, repr=False, compare=False)  # interval × burst
    window: int = field(init=False, repr=False, compare=False)  # whole seconds to earn the burst (`w`)

    def __post_init__(self) -> None:
        interval = self.per / self.rate
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "tolerance", interval * self.burst)
        object.__setattr__(self, "window", max(1, math.ceil(self.burst * interval)))


def parse_period(text: str) -> float:
    """Seconds in a period written as a number with `s`, `m` or `h` (`1s`, `30s`, `1m`, `h`)."""
    match = _PERIOD_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a period: write a number with s, m or h (1s, 30s, 1m, 1h)")
    seconds = float(match.group(1) or 1) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a period: it must be longer than zero")
    return seconds


def format_period(seconds: float) -> str:
    """The shortest spelling of `seconds` that `parse_period` reads back."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    # Fixed-point, never an exponent (`1e-05s` would not read back).
    return f"{seconds:.10f}".rstrip("0").rstrip(".") + "s"


def limit_problems(rate: object, per: object, burst: object = None) -> list[tuple[str, str]]:
    """Every (field, problem) of a limit's three fields as written (YAML, JSON); empty when usable."""
    problems = []
    good_rate = not isinstance(rate, bool) and isinstance(rate, int) and 1 <= rate <= MAX_COUNT
    if not good_rate:
        problems.append(("rate", f"must be an integer from 1 to {MAX_COUNT} per period, not {rate!r}"))
    seconds = 0.0
    if not isinstance(per, str):
        problems.append(("per", f"must be a period such as 1s, 1m or 1h, not {per!r}"))
    else:
        try:
            seconds = parse_period(per)
        except ValueError as exc:
            problems.append(("per", str(exc)))
        if seconds > _MAX_PERIOD:
            problems.append(("per", f"{per!r} is longer than a day (24h)"))
    if isinstance(rate, int) and not problems and seconds / rate < _MIN_INTERVAL:
        # The stores count whole microseconds between two requests.
        problems.append(("rate", f"{rate} per {per} is more than a million a second"))
    bad_burst = isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_COUNT
    if burst is not None and bad_burst:
        problems.append(("burst", f"must be an integer from 1 to {MAX_COUNT} at once, not {burst!r}"))
    return problems


def make_limit(rate: object, per: object, burst: object = None) -> Limit:
    """A Limit from its three fields as written; ValueError("field: problem") for the first bad one."""
    problems = limit_problems(rate, per, burst)
    if problems:
        field, problem = problems[0]
        raise ValueError(f"{field}: {problem}")
    assert isinstance(rate, int) and isinstance(per, str) and isinstance(burst, int | None)  # checked
    return Limit(rate=float(rate), per=parse_period(per), burst=rate if burst is None else burst)


def parse_spec(text: str) -> Limit:
    """`RATE/PERIOD[:BURST]` (`100/1s:200`, `10/1m`) → Limit; the burst defaults to the rate."""
    match = _SPEC_RE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a rate limit: write RATE/PERIOD[:BURST], for instance 100/1s:200")
    rate, per, burst = match.groups()
    return make_limit(int(rate), per, None if burst is None else int(burst))


def format_spec(limit: Limit) -> str:
    """`RATE/PERIOD:BURST`, as `parse_spec` reads it (how the store keeps a user's override)."""
    return f"{limit.rate:.0f}/{format_period(limit.per)}:{limit.burst}"


class Verdict(NamedTuple):
    """One decision: admitted or not, what is left, and when to come back (a tuple: made per request)."""

    allowed: bool
    remaining: int  # requests that would be admitted right now after this one
    retry_after: float  # seconds until one more would be admitted (0 when some are left)
    tat: float  # the key's new theoretical arrival time (when refused: only ever clamped)


def decide(limit: Limit, tat: float | None, now: float) -> Verdict:
    """Admit or refuse one request of a key whose stored TAT is `tat` (None: never seen)."""
    interval = limit.interval
    tolerance = limit.tolerance
    current = now if tat is None or tat < now else tat
    if current > now + tolerance:
        # Counted under a stricter limit (a reload or a user's new limit): an empty bucket of
        # this limit, not hours of another one's debt. Never true for a key counted under this
        # limit alone (an admission leaves its TAT at most there); the stores keep the clamp.
        current = now + tolerance
    new_tat = current + interval
    allowed_from = new_tat - tolerance
    # `left`: how many more intervals fit between the key's TAT and the edge of its tolerance.
    if now < allowed_from:
        left = math.floor((now + tolerance - current) / interval + 1e-9)
        kept = current if tat is not None else now
        return Verdict(False, left if left > 0 else 0, allowed_from - now, kept)
    left = math.floor((now + tolerance - new_tat) / interval + 1e-9)
    if left > 0:
        return Verdict(True, left, 0.0, new_tat)
    wait = new_tat - tolerance + interval - now
    return Verdict(True, 0, wait if wait > 0.0 else 0.0, new_tat)


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def policy_item(name: str, limit: Limit) -> str:
    """One `RateLimit-Policy` item (draft-ietf-httpapi-ratelimit-headers-10): `"name";q=…;w=…`."""
    return f'"{name}";q={limit.burst};w={limit.window}'


def limit_template(name: str) -> str:
    """One `RateLimit` item with `%d` for its two numbers (a store's fast path fills it in)."""
    return f'"{name}";r=%d;t=%d'


def limit_item(name: str, verdict: Verdict) -> str:
    """One `RateLimit` item: `"name";r=<requests left>;t=<whole seconds until one more>`."""
    return limit_template(name) % (verdict.remaining, math.ceil(verdict.retry_after))
