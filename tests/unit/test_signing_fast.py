"""The assertion's lean signer: the same tokens PyJWT makes, verified as PyJWT verifies.

`signing.compact_signer` replaces PyJWT's encode on the per-request path; these tests hold it
to PyJWT's own output (header segment and claims segment byte for byte, EdDSA's whole token
since Ed25519 is deterministic), to PyJWT's `decode` and the gateway's `signing.verify`, and
to the raw r||s form of an ES256 signature.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway import signing

ASSERTION_TYPE = "gateway-assertion+jwt"
LIFETIME = 60

KID = "sk_test"
CLAIMS: dict[str, Any] = {
    "iss": "gateway",
    "aud": "route:orders",
    "sub": 'svc-é/"quoted"',  # non-ASCII and escapes: PyJWT's JSON writes \u00e9 and \"
    "roles": ["reader", "writer"],
    "token_id": "tok_1",
    "method": "GET",
    "path": "/base/orders/1%2F2",
    "request_id": "0123456789abcdef0123456789abcdef",
    "iat": 1_700_000_000,
    "exp": 1_700_000_060,
    "jti": "AAAAAAAAAAAAAAAAAAAAAA",
}
URL_SAFE_22 = re.compile(r"[A-Za-z0-9_-]{22}")


@pytest.fixture
def now() -> float:
    """A moment just now, with a fraction: signing.verify checks `exp` against the real clock."""
    return int(time.time()) + 0.25


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@pytest.fixture(params=signing.ALGORITHMS)
def alg(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_lean_signer_supports_every_signing_algorithm() -> None:
    # A new algorithm in `generate` must get a lean path (or this test an exception).
    assert signing.ALGORITHMS == ("ES256", "EdDSA")


def test_lean_token_is_pyjwts_token(alg: str) -> None:
    key = signing.generate(alg)
    lean = signing.compact_signer(kid=KID, alg=alg, key=key, typ=ASSERTION_TYPE)(dict(CLAIMS))
    reference = signing.sign(CLAIMS, kid=KID, alg=alg, key=key, typ=ASSERTION_TYPE)
    header, payload, signature = lean.split(".")
    # Header and claims segments are PyJWT's byte for byte (sorted header keys, no padding).
    assert header == reference.split(".")[0]
    assert payload == reference.split(".")[1]
    assert jwt.get_unverified_header(lean) == jwt.get_unverified_header(reference)
    assert json.loads(unb64(header)) == {"alg": alg, "kid": KID, "typ": ASSERTION_TYPE}
    assert "=" not in lean
    # Both algorithms' JWS signatures are 64 raw bytes (ES256: r||s, 32 bytes each).
    assert len(unb64(signature)) == 64
    claims = jwt.decode(
        lean,
        key.public_key(),
        algorithms=[alg],
        audience="route:orders",
        options={
            "verify_exp": False,
            "verify_iat": False,
        },
    )
    assert claims == CLAIMS
    if alg == "EdDSA":  # deterministic signatures: the very same token
        assert lean == reference


def test_lean_token_passes_the_gateways_own_verification(alg: str, now: float) -> None:
    key = signing.generate(alg)
    claims = {**CLAIMS, "iat": int(now), "exp": int(now) + LIFETIME}
    token = signing.compact_signer(kid=KID, alg=alg, key=key, typ=ASSERTION_TYPE)(claims)
    keys = {KID: signing.VerifyKey(KID, alg, key.public_key())}
    verified = signing.verify(
        token,
        keys,
        typ=ASSERTION_TYPE,
        issuer="gateway",
        audience="route:orders",
        required=["sub", "jti"],
        now=now,
    )
    assert verified == claims
    # ...and under the wrong type (an access token's) it is refused, as before.
    with pytest.raises(signing.InvalidJwt, match="type"):
        signing.verify(
            token, keys, typ="at+jwt", issuer="gateway", audience="route:orders", required=[], now=now
        )


def test_es256_signature_is_raw_r_and_s() -> None:
    key = signing.generate("ES256")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    token = signing.compact_signer(kid=KID, alg="ES256", key=key, typ=ASSERTION_TYPE)(dict(CLAIMS))
    message, _, signature = token.rpartition(".")
    raw = unb64(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    # Raises InvalidSignature when the halves are not r and s of this message.
    key.public_key().verify(encode_dss_signature(r, s), message.encode(), ec.ECDSA(hashes.SHA256()))


def test_es256_keeps_leading_zero_bytes() -> None:
    # One r or s in 128 is under 2**248: its DER integer is short, the JWS half still 32 bytes.
    key = signing.generate("ES256")
    sign = signing.compact_signer(kid=KID, alg="ES256", key=key, typ=ASSERTION_TYPE)
    for _ in range(3000):
        token = sign(dict(CLAIMS))
        raw = unb64(token.rpartition(".")[2])
        assert len(raw) == 64
        if raw[0] == 0 or raw[32] == 0:
            break
    else:
        pytest.fail("no short r or s in 3000 signatures (a 1 in 10^10 chance)")
    assert (
        jwt.decode(
            token,
            key.public_key(),
            algorithms=["ES256"],
            options={"verify_signature": True, "verify_aud": False, "verify_exp": False, "verify_iat": False},
        )
        == CLAIMS
    )


def test_other_keys_fall_back_to_pyjwt() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    token = signing.compact_signer(kid=KID, alg="ES384", key=key, typ=ASSERTION_TYPE)(dict(CLAIMS))
    assert jwt.get_unverified_header(token) == {"alg": "ES384", "kid": KID, "typ": ASSERTION_TYPE}
    assert len(unb64(token.rpartition(".")[2])) == 96
    assert (
        jwt.decode(
            token,
            key.public_key(),
            algorithms=["ES384"],
            audience="route:orders",
            options={"verify_exp": False, "verify_iat": False},
        )
        == CLAIMS
    )
