"""The secret formats (`gw_` tokens, `gwk_` API keys): generation, format/checksum check, digest.

Imports: stdlib only. Pure functions; no I/O.

A token is ``gw_`` + 43 base62 characters (256 random bits) + a 6-character base62
checksum of those 43 characters; an API key secret is the same after ``gwk_``. The
checksum is public: it filters typos and truncation before any store query, never
forgeries (those are the negative cache's job). The prefixes tell the two apart, so a key
secret sent as a bearer token is refused by its shape (README "API keys and short-lived tokens").
"""

from __future__ import annotations

import hashlib
import secrets
import zlib

PREFIX = "gw_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 43  # 62**43 > 2**256
CHECKSUM_LENGTH = 6
TOKEN_LENGTH = len(PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
TOKEN_ID_PREFIX = "tok_"
KEY_PREFIX = "gwk_"
KEY_LENGTH = len(KEY_PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
KEY_ID_PREFIX = "key_"
_ALPHABET_SET = frozenset(ALPHABET)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate(prefix: str = PREFIX) -> str:
    """A new random token (or, with KEY_PREFIX, API key) secret: shown once, never stored."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))
    return prefix + body + _checksum(body)


def new_key_id() -> str:
    """A new public API key id (`key_…`): the client_id of the token exchange."""
    return KEY_ID_PREFIX + _base62(secrets.randbits(96), 16)


def new_token_id() -> str:
    """A new public token id (kept across resets, safe to log and to send upstream)."""
    return TOKEN_ID_PREFIX + _base62(secrets.randbits(96), 16)


def is_well_formed(token: str, prefix: str = PREFIX) -> bool:
    """True when `token` has the gw_ (or `prefix`) shape and a valid checksum (no store needed)."""
    if len(token) != len(prefix) + BODY_LENGTH + CHECKSUM_LENGTH or not token.startswith(prefix):
        return False
    body = token[len(prefix) : len(prefix) + BODY_LENGTH]
    if not _ALPHABET_SET.issuperset(body):
        return False
    return secrets.compare_digest(_checksum(body), token[-CHECKSUM_LENGTH:])


def digest(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and cached."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
