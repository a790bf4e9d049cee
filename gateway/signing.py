"""Signing keys: made here, sealed at rest, published as a JWKS, and used to sign and verify JWTs.

Imports: errors only, and the `cryptography` and PyJWT libraries (no hand-written crypto).

A signing key's private half is kept in the store sealed with AES-256-GCM under a key
derived from a secret that is never in the store (`GATEWAY_SECRET_KEY`, or a secret
file); the key id is the AEAD's associated data, so a sealed blob copied onto another
key's row does not open. Verification takes the key by `kid` among the gateway's own
keys only and allows that key's one algorithm: `none`, HS*, and every header that could
point at another key (`jku`, `jwk`, `x5u`, `x5c`) or demand unknown processing (`crit`)
are refused (the classic JWT bypasses, RFC 8725).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from jwt.types import Options

ALGORITHMS = ("ES256", "EdDSA")
MAX_JWT_BYTES = 8 * 1024
MAX_LEEWAY = 5.0
_FORBIDDEN_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit"})
_NONCE = 12
_SEAL_INFO = b"service-user-gateway signing-key seal v1"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SealError(Exception):
    """A sealed private key does not open with this secret (wrong secret, or tampered)."""


class InvalidJwt(Exception):
    """A JWT that must be refused; the message says why, without quoting the token."""


class ExpiredJwt(InvalidJwt):
    """A JWT whose `exp` has passed (leeway included)."""

    def __init__(self, expired_at: float) -> None:
        super().__init__("the token has expired")
        self.expired_at = expired_at


def new_kid() -> str:
    """A new public key id."""
    return "sk_" + secrets.token_urlsafe(12)


def generate(alg: str) -> PrivateKey:
    """A new private key for `alg` (ES256: P-256; EdDSA: Ed25519)."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {alg!r} (ES256 or EdDSA)")


def public_pem(key: PrivateKey) -> str:
    """The public half of `key` as PEM text (stored in the clear: it is public)."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def load_public(pem: str) -> PublicKey:
    """A public key from PEM text."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError("not an EC or Ed25519 public key")
    return key


def _wrapping_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(secret)


def seal(key: PrivateKey, kid: str, secret: bytes) -> bytes:
    """`key`'s private half encrypted (AES-256-GCM) under `secret`, bound to `kid`."""
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(_wrapping_key(secret)).encrypt(nonce, plain, kid.encode())


def unseal(blob: bytes, kid: str, secret: bytes) -> PrivateKey:
    """The private key sealed in `blob` for `kid`; SealError when it does not open."""
    try:
        plain = AESGCM(_wrapping_key(secret)).decrypt(blob[:_NONCE], blob[_NONCE:], kid.encode())
    except (InvalidTag, ValueError) as exc:  # a short blob raises ValueError
        raise SealError(f"signing key {kid} does not open with this secret") from exc
    key = serialization.load_der_private_key(plain, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise SealError(f"signing key {kid} is not an EC or Ed25519 key")
    return key


def secret_from_text(text: str) -> bytes:
    """The sealing secret from its text form (the secret file's content or the variable)."""
    value = text.strip()
    if len(value) < 32:
        raise ValueError("must be at least 32 characters (make one with `openssl rand -hex 32`)")
    return value.encode()


def new_secret_text() -> str:
    """A new sealing secret, as written to a fresh secret file (256 random bits, hex)."""
    return secrets.token_hex(32)


def public_jwk(kid: str, alg: str, key: PublicKey) -> dict[str, Any]:
    """The JWKS entry of a public key: kid, kty, crv, x, [y], alg, use."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        entry: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        entry = OKPAlgorithm.to_jwk(key, as_dict=True)
    entry.update({"kid": kid, "alg": alg, "use": "sig"})
    return entry


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One key a JWT may be verified with: its id, its one algorithm, its public half."""

    kid: str
    alg: str
    public: PublicKey


def sign(claims: Mapping[str, Any], *, kid: str, alg: str, key: PrivateKey, typ: str) -> str:
    """A compact JWS of `claims` with header {alg, kid, typ}."""
    return jwt.encode(dict(claims), key, algorithm=alg, headers={"kid": kid, "typ": typ})


Signer = Callable[[dict[str, Any]], str]

# What PyJWT's encode does per token, done once: the claims' JSON is PyJWT's exactly
# (compact separators, ASCII, insertion order), from one encoder instead of a new one a call.
_CLAIMS_JSON = json.JSONEncoder(separators=(",", ":")).encode


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def compact_signer(*, kid: str, alg: str, key: PrivateKey, typ: str) -> Signer:
    """`sign` for one key and `typ`, for a JWT on every request (the identity assertion).

    The same token as `sign` (header {alg, kid, typ} with PyJWT's sorted keys, the same claims
    JSON, base64url without padding), made without PyJWT's per-call work: the header segment
    is encoded once, and the signature comes from `cryptography` directly (ECDSA's DER turned
    into the JWS's fixed-width r||s). A key `generate` would not make goes through `sign`.
    """
    header = json.dumps({"alg": alg, "kid": kid, "typ": typ}, separators=(",", ":"), sort_keys=True)
    prefix = _b64(header.encode()) + b"."
    if alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return _es256(prefix, key)
    if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey):
        return _eddsa(prefix, key)
    return lambda claims: sign(claims, kid=kid, alg=alg, key=key, typ=typ)


def _es256(prefix: bytes, key: ec.EllipticCurvePrivateKey) -> Signer:
    ecdsa, key_sign = ec.ECDSA(hashes.SHA256()), key.sign

    def es256(claims: dict[str, Any]) -> str:
        message = prefix + _b64(_CLAIMS_JSON(claims).encode())
        r, s = decode_dss_signature(key_sign(message, ecdsa))
        return (message + b"." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))).decode()

    return es256


def _eddsa(prefix: bytes, key: ed25519.Ed25519PrivateKey) -> Signer:
    key_sign = key.sign

    def eddsa(claims: dict[str, Any]) -> str:
        message = prefix + _b64(_CLAIMS_JSON(claims).encode())
        return (message + b"." + _b64(key_sign(message))).decode()

    return eddsa


def verify(
    token: str,
    keys: Mapping[str, VerifyKey],
    *,
    typ: str,
    issuer: str,
    audience: str,
    required: Iterable[str],
    leeway: float = MAX_LEEWAY,
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of `token` when it is a valid JWT of type `typ` signed by one of `keys`.

    Raises InvalidJwt (ExpiredJwt for `exp`) naming the problem, never quoting the token.
    """
    if len(token) > MAX_JWT_BYTES:
        raise InvalidJwt("the token is longer than 8 KiB")
    header = _header(token)
    bad = sorted(_FORBIDDEN_HEADERS.intersection(header))
    if bad:
        raise InvalidJwt(f"the token's header carries {', '.join(bad)}, which is never accepted")
    if header.get("typ") != typ:
        raise InvalidJwt(f"the token's type is not {typ}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidJwt("the token is not signed by a current signing key of this gateway")
    if header.get("alg") != key.alg:
        raise InvalidJwt("the token's algorithm is not its signing key's")
    options: Options = {"require": ["exp", "iat", *required], "verify_iat": True, "strict_aud": True}
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public,
            algorithms=[key.alg],
            audience=audience,
            issuer=issuer,
            leeway=min(leeway, MAX_LEEWAY),
            options=options,
        )
    except jwt.ExpiredSignatureError as exc:
        raise ExpiredJwt(_exp_of(token)) from exc
    except jwt.ImmatureSignatureError as exc:
        raise InvalidJwt("the token is not valid yet") from exc
    except jwt.InvalidAudienceError as exc:
        raise InvalidJwt("the token is for another audience") from exc
    except jwt.InvalidIssuerError as exc:
        raise InvalidJwt("the token is from another issuer") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidJwt(f"the token lacks the '{exc.claim}' claim") from exc
    except jwt.InvalidSignatureError as exc:
        raise InvalidJwt("the token's signature is not valid") from exc
    except jwt.PyJWTError as exc:
        raise InvalidJwt("the token is not a valid JWT") from exc
    iat = claims.get("iat")
    current = now if now is not None else time.time()
    if isinstance(iat, int | float) and iat > current + min(leeway, MAX_LEEWAY):
        raise InvalidJwt("the token was issued in the future")
    return claims


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidJwt("the token is not a valid JWT") from exc
    return dict(header)


def _exp_of(token: str) -> float:
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0
