"""TLS on the gateway's own listeners: the server context, checks of the pair, reloads.

Imports: cryptography (certificate dates), stdlib.

Mozilla's "intermediate" profile: TLS 1.2 at least, ECDHE with AES-GCM or ChaCha20 only
(TLS 1.3's suites are all AEAD), no compression, ALPN `http/1.1` only. `SIGHUP` loads a new
pair into the live context, so new connections get it and open ones are not dropped; a pair
that does not load is refused and the old one stays (README "TLS on the listeners").
"""

from __future__ import annotations

import datetime
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

log = logging.getLogger("gateway.tls")

_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
EXPIRY_WARNING = datetime.timedelta(days=14)


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """A listener's `tls` block, paths absolute."""

    cert_file: str
    key_file: str
    key_password_file: str | None = None
    min_version: str = "1.2"  # "1.2" or "1.3"


def server_context(tls: ListenerTls) -> ssl.SSLContext:
    """A server context for `tls` with its pair loaded (ssl.SSLError / OSError / ValueError when bad)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    load_pair(context, tls)
    return context


def load_pair(context: ssl.SSLContext, tls: ListenerTls) -> None:
    """Load the certificate chain and key of `tls` into `context`."""
    # Never None: OpenSSL would then ask for an encrypted key's pass phrase on the terminal,
    # which freezes a running gateway on SIGHUP. An empty one makes such a key a clear error.
    password: str | bytes = b""
    if tls.key_password_file is not None:
        password = Path(tls.key_password_file).read_text().rstrip("\r\n")
    context.load_cert_chain(tls.cert_file, tls.key_file, password=password)


def check_pair(tls: ListenerTls, now: datetime.datetime | None = None) -> str | None:
    """Refuse an unusable pair (ValueError naming the problem); a warning when it expires soon."""
    try:
        server_context(tls)  # a throwaway context: the files load and the key matches
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ValueError(f"the certificate and key do not load together ({reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read the certificate or key ({exc.strerror or exc})") from None
    try:
        leaf = x509.load_pem_x509_certificate(Path(tls.cert_file).read_bytes())
    except ValueError as exc:
        raise ValueError(f"cert_file is not a PEM certificate ({exc})") from None
    moment = now or datetime.datetime.now(datetime.UTC)
    expires = leaf.not_valid_after_utc
    if expires <= moment:
        raise ValueError(f"the certificate expired on {expires:%Y-%m-%dT%H:%M:%SZ}")
    starts = leaf.not_valid_before_utc
    if starts > moment:
        raise ValueError(f"the certificate is not valid before {starts:%Y-%m-%dT%H:%M:%SZ}")
    if expires - moment <= EXPIRY_WARNING:
        return f"the certificate expires on {expires:%Y-%m-%dT%H:%M:%SZ} (within 14 days)"
    return None


def reload_pair(context: ssl.SSLContext, tls: ListenerTls, listener: str) -> bool:
    """Load a new pair into the live `context` after checking it; on failure keep the old one."""
    try:
        warning = check_pair(tls)
    except ValueError as exc:
        log.error(
            "TLS certificate reload refused; the previous certificate stays",
            extra={"listener": listener, "problem": str(exc)},
        )
        return False
    load_pair(context, tls)
    if warning:
        log.warning("TLS certificate expires soon", extra={"listener": listener, "problem": warning})
    log.info("TLS certificate reloaded", extra={"listener": listener})
    return True
