"""The assertion's lean signer and its `jti`s: the same tokens PyJWT makes, verified as PyJWT verifies.

`signing.compact_signer` replaces PyJWT's encode on the per-request path; these tests hold it
to PyJWT's own output (header segment and claims segment byte for byte, EdDSA's whole token
since Ed25519 is deterministic), to PyJWT's `decode` and the gateway's `signing.verify`, and
to the raw r||s form of an ES256 signature. The `jti`s come from a batched CSPRNG read.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway import assertion, signing
from gateway.assertion import ASSERTION_TYPE, LIFETIME, Assertions
from gateway.keyring import KeyRing, RingKey

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


# -- Assertions.sign ---------------------------------------------------------------------------


def ring_of(alg: str) -> KeyRing:
    key = signing.generate(alg)
    return KeyRing([RingKey(signing.new_kid(), alg, key.public_key(), key, 0.0, 0.0, None)], 3600)


def assert_one(assertions: Assertions, target: str = "/orders/1%2F2") -> str:
    settings = SimpleNamespace(config=SimpleNamespace(signing=SimpleNamespace(issuer="gateway")))
    decision = SimpleNamespace(
        route=SimpleNamespace(config=SimpleNamespace(name="orders", upstream="http://up:9000/base")),
        principal=SimpleNamespace(user="svc", token_id="tok_1"),
        roles=("reader", "writer"),
        method="POST",
    )
    return assertions.sign(settings, decision, target, "rid-1")  # type: ignore[arg-type]


def verified(token: str, ring: KeyRing, now: float) -> dict[str, Any]:
    return signing.verify(
        token,
        ring.verify_keys(now),
        typ=ASSERTION_TYPE,
        issuer="gateway",
        audience="route:orders",
        required=["sub", "jti"],
        now=now,
    )


def test_assertion_claims(alg: str, now: float) -> None:
    ring = ring_of(alg)
    assertions = Assertions(lambda: ring, clock=lambda: now)
    first, second = assert_one(assertions), assert_one(assertions, "/other")
    claims = verified(first, ring, now)
    jti = claims.pop("jti")
    assert URL_SAFE_22.fullmatch(jti)
    assert claims == {
        "iss": "gateway",
        "aud": "route:orders",
        "sub": "svc",
        "roles": ["reader", "writer"],
        "token_id": "tok_1",
        "method": "POST",
        "path": "/base/orders/1%2F2",
        "request_id": "rid-1",
        "iat": int(now),
        "exp": int(now) + LIFETIME,
    }
    again = verified(second, ring, now)
    assert again["path"] == "/base/other" and again["jti"] != jti
    assert jwt.get_unverified_header(first) == {"alg": alg, "kid": ring.keys[0].kid, "typ": ASSERTION_TYPE}


def test_assertion_follows_a_new_ring(now: float) -> None:
    rings = [ring_of("ES256")]
    assertions = Assertions(lambda: rings[-1], clock=lambda: now)
    assert jwt.get_unverified_header(assert_one(assertions))["kid"] == rings[0].keys[0].kid
    rings.append(ring_of("EdDSA"))  # rotated (and another algorithm): the cached signer goes
    token = assert_one(assertions)
    assert jwt.get_unverified_header(token)["kid"] == rings[1].keys[0].kid
    verified(token, rings[1], now)
    with pytest.raises(signing.InvalidJwt):
        verified(token, rings[0], now)


# -- jti ----------------------------------------------------------------------------------------


def test_jtis_are_url_safe_and_unique() -> None:
    jtis = [assertion.new_jti() for _ in range(100_000)]
    assert len(set(jtis)) == len(jtis)
    assert all(URL_SAFE_22.fullmatch(jti) for jti in jtis)


def test_a_forked_child_draws_other_jtis() -> None:
    assertion.new_jti()  # the parent's pool is filled: a child would inherit it
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next jtis and leave without pytest's clean-up
        try:
            os.write(writer, " ".join(assertion.new_jti() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [assertion.new_jti() for _ in range(3)]
    assert len(child) == 3 and all(URL_SAFE_22.fullmatch(jti) for jti in child)
    assert not set(child) & set(parent)
