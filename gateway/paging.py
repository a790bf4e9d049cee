"""Pages of the admin API's lists: `limit`, an opaque `after` cursor, and `{"items", "next"}`.

Imports: errors. Pure functions.

The cursor holds the sort key of the last item of a page (a name; an API key's creation
time and id; an audit event's id), never an offset, so a page stays right while rows are
added or removed in front of it: each row that exists during the whole walk comes
exactly once. It is base64url JSON, opaque to clients and checked on the way back in.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Final

from gateway.errors import Invalid

DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
MAX_CURSOR: Final = 1024  # characters: a cursor holds one sort key
_DIGITS: Final = re.compile(r"[0-9]{1,7}")
BAD_CURSOR: Final = "after must be the `next` value of an earlier page of this list"

Key = tuple[str | int, ...]


def encode_cursor(key: Key) -> str:
    """The cursor that continues after the item whose sort key is `key`."""
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, shape: tuple[type, ...]) -> Key:
    """The sort key inside a cursor this API handed out; Invalid("after") for anything else."""
    problem = Invalid("after", BAD_CURSOR)
    if len(text) > MAX_CURSOR:
        raise problem
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise problem from None
    if not isinstance(values, list) or len(values) != len(shape):
        raise problem
    for value, kind in zip(values, shape, strict=True):
        # bool is an int to isinstance; a cursor never holds one.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise problem
    return tuple(values)


def parse_limit(values: list[str]) -> int:
    """The page size from the `limit` query values: 1–1000, default 100."""
    if len(values) > 1:
        raise Invalid("limit", "limit may be given only once")
    if not values:
        return DEFAULT_PAGE
    if _DIGITS.fullmatch(values[0]) is None or not 1 <= int(values[0]) <= MAX_PAGE:
        raise Invalid("limit", f"limit must be an integer between 1 and {MAX_PAGE}")
    return int(values[0])
