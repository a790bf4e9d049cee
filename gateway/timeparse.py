"""Times on the outside of the gateway: parse operator input, format output (README "Command line").

Imports: stdlib only. Pure functions.

Input is ISO 8601: a date alone means 00:00 UTC that day, a time without a zone means
UTC, and ``Z`` is accepted. Output is always UTC with ``Z``, to the second.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

__all__ = ["format_duration", "format_time", "parse_duration", "parse_time", "to_utc", "utcnow"]

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def to_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime; a naive value is taken to be UTC already."""
    if moment.tzinfo is None or moment.tzinfo.utcoffset(moment) is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 date or date-time into an aware UTC datetime.

    Raises ValueError with a message fit for an operator (it names the expected forms).
    """
    # RFC 3339 allows lower-case separators; fromisoformat does not.
    value = text.strip().replace("t", "T").replace("z", "Z")
    if not value:
        raise ValueError("empty time; expected an ISO 8601 date (2027-01-01) or date-time")
    try:
        if _DATE_ONLY.match(value):
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        # fromisoformat (3.11) accepts "Z", "T" or " " as separator, and offsets.
        return to_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise ValueError(
            f"invalid time {value!r}; expected ISO 8601, e.g. 2027-01-01 or 2027-01-01T12:00:00Z"
        ) from None


def format_time(moment: datetime) -> str:
    """`moment` in UTC as ISO 8601 with ``Z``, to the second (``2026-01-01T00:00:00Z``)."""
    return to_utc(moment).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def parse_duration(value: object) -> float:
    """Seconds in a duration written as a number of seconds or a number with s, m, h or d
    (`90`, `30s`, `15m`, `1h`, `365d`); ValueError naming the forms otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration: write seconds or a number with s, m, h or d (1h, 365d)"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{value!r} is not a duration: it must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest spelling of `seconds` that `parse_duration` reads back (`1h`, `365d`, `90s`)."""
    for unit in ("d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"
