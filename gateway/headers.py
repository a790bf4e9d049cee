"""Header hygiene both ways: what the upstream may see, and what the client gets back.

Imports: config, handshake, randomness and multidict only. Built once per configuration; runs on
every request.

Order matters and is the security property: everything a client could use to spoof
an identity is stripped *before* the gateway sets its own values, so a client's
`Connection:` list or a header spelt `X_Service_User` can never win.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from gateway.config import IdentityConfig
from gateway.handshake import without_bearer
from gateway.randomness import random_bytes

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# From an untrusted peer these are dropped and rebuilt (spelt with '_' or '.' too).
_FORWARDING = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x-forwarded-server",
        "x-client-ip",
        "true-client-ip",
    }
)
# Never forwarded: upstream frameworks act on these (Symfony and Express read a method
# override, IIS and Symfony a rewritten URL), so they could turn an authorised GET into a
# DELETE, or a request for an allowed path into one for another.
_REINTERPRETING = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    }
)
# Names whose '_' or '.' spellings are dropped even where the '-' spelling passes: an
# upstream that folds them would read a second Content-Length or X-Forwarded-For.
_SPELLING_SENSITIVE = frozenset(
    _HOP_BY_HOP | _FORWARDING | {"content-length", "host", "authorization", "expect", "x-request-id"}
)
# As nginx does, the upstream's `Server` (its software and version) is not passed on: the
# client gets the gateway's own, which names no version (README "Headers the client receives").
_RESPONSE_DROP = _HOP_BY_HOP | {"server"}
_DEFAULT_IDENTITY = frozenset(
    {"x-service-user", "x-service-user-roles", "x-service-token-id", "x-service-user-assertion"}
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_FOLD = str.maketrans("_.", "--")
_SUBPROTOCOL = frozenset({"sec-websocket-protocol"})

TrustedNetworks = tuple[IPv4Network | IPv6Network, ...]


def fold(name: str) -> str:
    """Lower-case a header name and read '_' and '.' as '-', as Python and PHP upstreams do."""
    folded = _FOLDED.get(name)
    if folded is None:
        folded = name.lower().translate(_FOLD)
        if len(_FOLDED) < 4096:  # the names clients send are few; junk must not grow it
            _FOLDED[name] = folded
    return folded


# Folded names by spelling: every request folds each of its header names, and they repeat.
_FOLDED: dict[str, str] = {}


def new_request_id() -> str:
    """A fresh request id (128 random bits, hex)."""
    return random_bytes(16).hex()


def request_id_from(headers: CIMultiDictProxy[str]) -> str:
    """The client's X-Request-Id when it is sane, else a new one."""
    given = headers.get("X-Request-Id")
    if given is not None and _REQUEST_ID.fullmatch(given) is not None:
        return given
    return new_request_id()


class HeaderPolicy:
    """Builds upstream request headers and client response headers for one configuration."""

    def __init__(self, identity: IdentityConfig, trusted_proxies: TrustedNetworks) -> None:
        self.identity = identity
        self._trusted = trusted_proxies
        self._trusted_cache: dict[str, bool] = {}
        identity_names = {
            fold(identity.user_header),
            fold(identity.roles_header),
            fold(identity.token_id_header),
            fold(identity.assertion_header),
        }
        self._identity = frozenset(identity_names | _DEFAULT_IDENTITY)
        # Names the gateway always drops from the client's request before setting its own.
        self._always_drop = (
            self._identity | _HOP_BY_HOP | _REINTERPRETING | {"authorization", "expect", "x-request-id"}
        )

    def is_identity(self, name: str) -> bool:
        """Whether `name` is any spelling of an identity header (case, '_' or '.' for '-')."""
        return fold(name) in self._identity

    def is_trusted(self, peer: str | None) -> bool:
        """Whether `peer` is listed in trusted_proxies (its X-Forwarded-* are kept)."""
        if peer is None or not self._trusted:
            return False
        known = self._trusted_cache.get(peer)
        if known is None:
            known = self._listed(peer)
            if len(self._trusted_cache) < 4096:
                self._trusted_cache[peer] = known
        return known

    def _listed(self, text: str) -> bool:
        """Whether `text` is an address in trusted_proxies."""
        try:
            address: IPv4Address | IPv6Address = ip_address(text)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def client_address(self, inbound: CIMultiDictProxy[str] | MultiMapping[str], peer: str | None) -> str:
        """The client a request comes from, for per-address limits (README "Rate limits").

        The peer itself, unless it is a trusted proxy: then the right-most `X-Forwarded-For`
        entry that is not one (entries left of it are whatever the client wrote). IPv6 clients
        count per /64, the block one host is usually given.
        """
        client = peer or "unknown"
        if self.is_trusted(peer) and "X-Forwarded-For" in inbound:
            entries = ",".join(inbound.getall("X-Forwarded-For")).split(",")
            for entry in reversed(entries):
                client = _without_port(entry.strip()[:64]) or "unknown"
                if not self._listed(client):  # not cached: these are the clients' words
                    break
        if ":" not in client:
            return client
        try:
            address = IPv6Address(client.strip("[]"))
        except ValueError:
            return client
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)  # one IPv4 client, not a /64 shared by all of them
        return str(IPv6Network((int(address) >> 64 << 64, 64)))

    def upstream_headers(
        self,
        inbound: CIMultiDictProxy[str],
        *,
        peer: str | None,
        scheme: str,
        preserve_host: bool,
        request_id: str,
        identity: tuple[str, str, str] | None,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request; `identity` is (user, roles, token id) or None."""
        trusted = self.is_trusted(peer)
        drop = self._always_drop
        if "Connection" in inbound:
            # A client may name headers in Connection (every line of it counts, RFC 9110
            # section 7.6.1); never let that reach our own.
            named = connection_named(inbound)
            if not named <= drop:
                drop = drop | named
        protocols = None
        if "Sec-WebSocket-Protocol" in inbound:
            # A bearer.<credential> entry is a credential: never forwarded, on any route.
            drop = drop | _SUBPROTOCOL
            protocols = without_bearer(inbound.getall("Sec-WebSocket-Protocol"))
        out: CIMultiDict[str] = CIMultiDict()
        client_host = inbound.get("Host")
        for name, value in inbound.items():
            folded = fold(name)
            if folded in drop:
                continue
            if folded in _SPELLING_SENSITIVE and ("_" in name or "." in name):
                continue
            if folded == "host" and not preserve_host:
                continue
            if folded in _FORWARDING and not trusted:
                continue
            out.add(name, value)
        if protocols is not None:
            out["Sec-WebSocket-Protocol"] = protocols
        if identity is not None:
            user, roles, token_id = identity
            out[self.identity.user_header] = user
            out[self.identity.roles_header] = roles
            out[self.identity.token_id_header] = token_id
        out["X-Request-Id"] = request_id
        self._set_forwarding(out, inbound, trusted, peer, scheme, client_host)
        return out

    @staticmethod
    def _set_forwarding(
        out: CIMultiDict[str],
        inbound: CIMultiDictProxy[str],
        trusted: bool,
        peer: str | None,
        scheme: str,
        client_host: str | None,
    ) -> None:
        peer_text = peer or "unknown"
        if trusted and "X-Forwarded-For" in inbound:
            prior = ", ".join(inbound.getall("X-Forwarded-For"))
            out.popall("X-Forwarded-For", None)
            out["X-Forwarded-For"] = f"{prior}, {peer_text}"
        else:
            out["X-Forwarded-For"] = peer_text
        if not (trusted and "X-Forwarded-Proto" in out):
            out["X-Forwarded-Proto"] = scheme
        if not (trusted and "X-Forwarded-Host" in out) and client_host is not None:
            out["X-Forwarded-Host"] = client_host


def response_headers(
    upstream: CIMultiDictProxy[str], *, drop_cors: bool, request_id: str
) -> CIMultiDict[str]:
    """Headers for the client from the upstream's response (hop-by-hop and `Server` removed)."""
    drop = _RESPONSE_DROP
    if "Connection" in upstream:
        named = connection_named(upstream)
        if not named <= drop:
            drop = drop | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lowered = name.lower()
        if lowered in drop:
            continue
        if drop_cors and lowered.startswith("access-control-"):
            continue
        out.add(name, value)
    out["X-Request-Id"] = request_id
    return out


def _without_port(entry: str) -> str:
    """`1.2.3.4:5678` → `1.2.3.4`, `[2001:db8::1]:443` → `2001:db8::1` (some balancers add the port)."""
    if entry.startswith("["):
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry


def connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The header names listed in every `Connection` line of `headers`, folded."""
    lines = headers.getall("Connection", ())
    if len(lines) == 1:
        return _connection_line(lines[0])
    return frozenset(fold(part.strip()) for line in lines for part in line.split(",") if part.strip())


def _connection_line(line: str) -> frozenset[str]:
    # Nearly every answer (and many requests) says `Connection: keep-alive` or `close`: the
    # names of a line are folded once, not on every message.
    named = _CONNECTION_LINES.get(line)
    if named is None:
        named = frozenset(fold(part.strip()) for part in line.split(",") if part.strip())
        if len(_CONNECTION_LINES) < 1024:  # the spellings seen are few; junk must not grow it
            _CONNECTION_LINES[line] = named
    return named


_CONNECTION_LINES: dict[str, frozenset[str]] = {}


def merge_vary(values: Iterable[str], *extra: str) -> str:
    """One `Vary` value from every line the upstream sent plus `extra`, each field name once."""
    seen: dict[str, str] = {}
    for line in (*values, *extra):
        for part in line.split(","):
            name = part.strip()
            if name:
                seen.setdefault(name.lower(), name)
    return "*" if "*" in seen else ", ".join(seen.values())
