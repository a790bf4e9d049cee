"""Canonical request paths: decode once from the raw path, refuse anything ambiguous.

Imports: errors only. Pure functions; this runs on every proxied request.

What the rules match and what the upstream receives are the same path: the upstream
gets the canonical path re-encoded, so an upstream that decodes differently from us
(`%2F`, `..`, `\\`, `;` path parameters) can never be shown a path that was not authorised.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from gateway.errors import BadRequest

# RFC 3986 pchar without ';' (refused: Tomcat and Spring read it as path parameters)
# and without '%' (escapes take the slow path).
_PCHAR = "A-Za-z0-9\\-._~!$&'()*+,=:@"
_PLAIN_PATH = re.compile(f"(?:/[{_PCHAR}]+)*/?")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SAFE = "-._~!$&'()*+,=:@"


def split_target(raw_target: str) -> tuple[str, str]:
    """Split a raw request target into (raw path, raw query without '?'; '' when absent)."""
    path, _, query = raw_target.partition("?")
    return path, query


def canonicalize(raw_path: str) -> tuple[str, str]:
    """Return (canonical decoded path, the same path re-encoded for the upstream).

    Raises BadRequest for dot segments (raw or encoded), encoded '/' or '\\', raw '\\',
    NUL, ';', empty segments, bad or non-UTF-8 escapes, control characters, fragments.
    """
    if _PLAIN_PATH.fullmatch(raw_path) is not None:
        # Fast path: nothing to decode; only dot segments and '//' need a look.
        if _DOT_SEGMENT.search(raw_path) is not None:
            raise BadRequest("path contains a '.' or '..' segment")
        if "//" in raw_path:
            raise BadRequest("path contains an empty segment ('//')")
        return raw_path, raw_path
    if not raw_path.startswith("/"):
        raise BadRequest("path must start with '/'")
    segments = raw_path[1:].split("/")
    last = len(segments) - 1
    decoded: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "" and index != last:
            raise BadRequest("path contains an empty segment ('//')")
        for char in ("\\", ";", "\x00", "#"):
            if char in segment:
                raise BadRequest(f"path contains a forbidden character {char!r}")
        text = _decode(segment)
        if text in (".", ".."):
            raise BadRequest("path contains a '.' or '..' segment")
        decoded.append(text)
    canonical = "/" + "/".join(decoded)
    encoded = "/" + "/".join(quote(text, safe=_SAFE) for text in decoded)
    return canonical, encoded


def _decode(segment: str) -> str:
    if _ESCAPE.search(segment) is not None:
        raise BadRequest("path contains an invalid percent-escape")
    try:
        raw = bytes(_unescape_bytes(segment))
        text = raw.decode("utf-8")
    except UnicodeError as exc:
        raise BadRequest("path escapes do not decode to UTF-8") from exc
    for char in text:
        if char in "/\\;" or ord(char) < 0x20 or ord(char) == 0x7F:
            raise BadRequest(f"path contains an encoded forbidden character {char!r}")
    return text


def _unescape_bytes(segment: str) -> bytearray:
    out = bytearray()
    index = 0
    length = len(segment)
    while index < length:
        char = segment[index]
        if char == "%":
            out.append(int(segment[index + 1 : index + 3], 16))
            index += 3
        else:
            out.extend(char.encode("utf-8", "surrogateescape"))
            index += 1
    return out
