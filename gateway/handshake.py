"""The WebSocket handshake as the gateway reads it (README "WebSocket"); pure functions.

Imports: errors only. The decision calls these on `websocket: true` routes; the relay
(gateway.websocket) computes the upstream's expected `Sec-WebSocket-Accept` here.

A browser cannot set `Authorization` on a WebSocket, so a credential may travel as one
`Sec-WebSocket-Protocol` entry `bearer.<credential>`. That entry is only another place to
find the credential: it is taken out here, authenticated like a bearer token, and never
forwarded, echoed or logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence

from multidict import MultiMapping

from gateway.errors import BadRequest

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
BEARER = "bearer."
# A subprotocol name is an RFC 9110 token; gw_ tokens and JWTs fit in one as they are.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


HeaderView = MultiMapping[str]  # a request's headers (case-insensitive)


def is_handshake(method: str, headers: HeaderView) -> bool:
    """Whether this is a WebSocket opening handshake: GET, `Upgrade: websocket`, and a
    `Connection` that lists `upgrade` (Firefox sends `keep-alive, Upgrade`)."""
    if method != "GET":
        return False
    upgrade = headers.get("Upgrade")
    if upgrade is None or upgrade.strip().lower() != "websocket":
        return False
    lines = headers.getall("Connection", ())
    return any(part.strip().lower() == "upgrade" for line in lines for part in line.split(","))


def check_handshake(headers: HeaderView) -> None:
    """Refuse (400) a handshake without version 13, a valid key, or with a body."""
    if list(headers.getall("Sec-WebSocket-Version", ())) != ["13"]:
        raise BadRequest("a WebSocket handshake needs Sec-WebSocket-Version: 13")
    keys = headers.getall("Sec-WebSocket-Key", ())
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise BadRequest("a WebSocket handshake needs one Sec-WebSocket-Key: 16 random bytes in base64")
    if "Transfer-Encoding" in headers or headers.get("Content-Length", "0") != "0":
        # After the upgrade nothing may be read as HTTP: a body here has no place to go.
        raise BadRequest("a WebSocket handshake has no body")


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def subprotocol_credential(
    headers: HeaderView, authorization: Sequence[str]
) -> tuple[list[str], tuple[str, ...]]:
    """(the Authorization values to authenticate, the subprotocols to offer upstream).

    A `bearer.<credential>` entry becomes `Bearer <credential>`; it must be the only one,
    beside at least one real subprotocol, and without an Authorization header (400).
    """
    offered: list[str] = []
    bearers: list[str] = []
    for line in headers.getall("Sec-WebSocket-Protocol", ()):
        for part in line.split(","):
            name = part.strip()
            if not name:
                continue
            if _TOKEN.fullmatch(name) is None:
                raise BadRequest("Sec-WebSocket-Protocol holds an entry that is not a valid subprotocol name")
            (bearers if name[:7].lower() == BEARER else offered).append(name)
    if not bearers:
        return list(authorization), tuple(offered)
    if len(bearers) > 1:
        raise BadRequest("Sec-WebSocket-Protocol holds more than one bearer.<credential> entry")
    if authorization:
        raise BadRequest("a credential both in Sec-WebSocket-Protocol and in Authorization: send one")
    if not offered:
        raise BadRequest(
            "Sec-WebSocket-Protocol offers only the bearer.<credential> entry: offer a real subprotocol too"
        )
    credential = bearers[0][len(BEARER) :]
    if not credential:
        raise BadRequest("the bearer.<credential> entry in Sec-WebSocket-Protocol is empty")
    return [f"Bearer {credential}"], tuple(offered)


def without_bearer(values: Sequence[str]) -> str | None:
    """A `Sec-WebSocket-Protocol` value with every bearer entry removed (None: nothing left)."""
    kept = [
        name
        for line in values
        for part in line.split(",")
        if (name := part.strip()) and name[:7].lower() != BEARER
    ]
    return ", ".join(kept) or None


def new_key() -> str:
    """A fresh `Sec-WebSocket-Key` for the gateway's own handshake with the upstream."""
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    """The `Sec-WebSocket-Accept` an upstream must answer to `key` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324
