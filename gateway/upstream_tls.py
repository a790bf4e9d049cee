"""How the gateway talks TLS to an upstream: a route's `tls` block and its client context.

Imports: stdlib only (config parses into `UpstreamTls`; upstream builds the context).

Python's default client context (system trust store, TLS 1.2 floor, host name checked) is
the base; a route may trust its own CA bundle instead, present a client certificate
(mutual TLS), check another name than the URL's host (and send it as SNI), or, with a
warning logged at every start, not verify at all (README "Upstream TLS").
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """A route's `tls` block, paths absolute."""

    ca_file: str | None = None  # PEM CA bundle trusted instead of the system's
    cert_file: str | None = None  # PEM client certificate (leaf first), for mutual TLS
    key_file: str | None = None  # its private key
    server_name: str | None = None  # SNI and the name checked; None: the upstream URL's host
    verify: bool = True


def client_context(tls: UpstreamTls | None) -> ssl.SSLContext:
    """The client context for `tls` (None: the defaults); raises OSError / ssl.SSLError on bad files."""
    context = ssl.create_default_context(cafile=tls.ca_file if tls is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if tls is None:
        return context
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def handshake_reason(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, in words an operator can act on (None: not a TLS error)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.strerror or exc}"
    return None
