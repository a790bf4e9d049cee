"""API keys and short-lived tokens (CONTRACT "API keys and short-lived tokens", Okta ASA style).

Real `gateway serve` processes, the real CLI, real stores (SQLite file, and PostgreSQL for the
flow across instances), a real upstream; no mocks. Forged JWTs are built byte by byte here, the
ones that must carry a *valid* signature signed with the gateway's own key, unsealed from the
store with the secret in `gateway.secret`, so that only the check under test can refuse them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from multidict import CIMultiDictProxy
from sqlalchemy.engine import make_url

from gateway import signing, tokens
from gateway.policy import RouteTable
from gateway.services import Directory
from gateway.store import open_store
from tests.conftest import FRESHNESS_SECONDS, write_config
from tests.process import REPO, GatewayProcess
from tests.upstream import SEEN

TOKEN = "/.gateway/token"
JWKS = "/.gateway/jwks.json"
FORM = "application/x-www-form-urlencoded"
GRANT = "grant_type=client_credentials"
POLL = 0.05


# -- helpers ---------------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def cli_ok(config: Path, *args: str) -> str:
    done = cli(config, *args)
    assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def cli_key(config: Path, user: str, *options: str) -> tuple[str, str]:
    """`gateway key create --user USER ...`: the printed key id and secret."""
    out = cli_ok(config, "key", "create", "--user", user, *options)
    (key_id,) = [
        line.removeprefix("Key ID: ").strip() for line in out.splitlines() if line.startswith("Key ID: ")
    ]
    (secret,) = [
        line.removeprefix("Key secret: ").strip()
        for line in out.splitlines()
        if line.startswith("Key secret: ")
    ]
    return key_id, secret


def basic(key_id: str, secret: str) -> str:
    """RFC 6749 section 2.3.1: Basic base64(urlencode(id):urlencode(secret))."""
    return "Basic " + base64.b64encode(f"{quote_plus(key_id)}:{quote_plus(secret)}".encode()).decode()


def form_credentials(key_id: str, secret: str, extra: str = "") -> str:
    return f"{GRANT}&client_id={quote_plus(key_id)}&client_secret={quote_plus(secret)}{extra}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, signature unchecked (for assertions only)."""
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


async def admin_token(store_url: str) -> str:
    """Create (and migrate) the store with an admin `root`; its token's secret."""
    store = await open_store(store_url, migrate=True)
    try:
        directory = Directory(store, lambda: RouteTable({}, ()))
        await directory.create_user("root", actor="test", admin=True)
        _, secret = await directory.create_token("root", "adm", actor="test")
    finally:
        await store.close()
    return secret


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]
    text: str


async def request(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Reply:
    async with session.request(method, url, **kwargs) as response:
        text = await response.text()
        body = None
        if response.content_type == "application/json" and text:
            body = json.loads(text)
        return Reply(response.status, body, response.headers, text)


def upstream_headers(reply: Reply) -> dict[str, str]:
    """The headers the echo upstream says it received (names lower-cased)."""
    return {name.lower(): value for name, value in reply.body["headers"]}


async def delay_until(check: Callable[[], Awaitable[bool]], give_up: float = 3.0) -> float:
    """Seconds until `check` holds, polling every 50 ms (inf when it does not within `give_up`)."""
    started = time.monotonic()
    while time.monotonic() - started < give_up:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(POLL)
    return float("inf")


@dataclass
class Gw:
    """One running `gateway serve`, a client session, and the admin token of its store."""

    process: GatewayProcess
    session: aiohttp.ClientSession
    admin_secret: str

    async def exchange(
        self,
        body: str | bytes = GRANT,
        *,
        authorization: str | None = None,
        content_type: str | None = FORM,
        query: str = "",
        method: str = "POST",
    ) -> Reply:
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        if content_type is not None:
            headers["Content-Type"] = content_type
        data = body.encode() if isinstance(body, str) else body
        return await request(
            self.session, method, self.process.proxy + TOKEN + query, data=data, headers=headers
        )

    async def mint(self, key_id: str, secret: str, scope: str | None = None) -> str:
        extra = "" if scope is None else "&scope=" + quote_plus(scope)
        reply = await self.exchange(GRANT + extra, authorization=basic(key_id, secret))
        assert reply.status == 200, reply.text
        token: str = reply.body["access_token"]
        return token

    async def proxy(self, bearer: str | None, method: str = "GET", path: str = "/echo/x") -> Reply:
        headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
        return await request(self.session, method, self.process.proxy + path, headers=headers)

    async def admin(self, method: str, path: str, body: Any = None, *, bearer: str | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {bearer or self.admin_secret}"}
        return await request(self.session, method, self.process.admin + path, json=body, headers=headers)

    async def user(self, name: str, roles: list[str]) -> None:
        created = await self.admin("POST", "/v1/service-users", {"name": name, "roles": roles})
        assert created.status == 201, created.text

    async def key(self, user: str, **fields: Any) -> tuple[str, str]:
        created = await self.admin("POST", f"/v1/service-users/{user}/keys", fields)
        assert created.status == 201, created.text
        return created.body["id"], created.body["secret"]


@contextlib.asynccontextmanager
async def started(
    config: Path, admin_secret: str, session: aiohttp.ClientSession, count: int = 1
) -> AsyncIterator[list[Gw]]:
    processes = [GatewayProcess(config) for _ in range(count)]
    try:
        await asyncio.gather(*(p.wait_ready() for p in processes))
        yield [Gw(p, session, admin_secret) for p in processes]
    finally:
        for process in processes:
            process.stop()


def sqlite_config(tmp_path: Path, upstream: TestServer) -> tuple[Path, str]:
    store_url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upstream_url = str(upstream.make_url("")).rstrip("/")
    return write_config(tmp_path, store_url=store_url, upstream_url=upstream_url), store_url


@pytest.fixture
async def gw(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Gw]:
    """One `gateway serve` on a SQLite file; users `svc` (writer) and `root` (admin) exist."""
    config, store_url = sqlite_config(tmp_path, upstream)
    secret = await admin_token(store_url)
    async with aiohttp.ClientSession() as session, started(config, secret, session) as (one,):
        await one.user("svc", ["writer"])
        yield one


def signing_material(directory: Path) -> tuple[str, str, signing.PrivateKey]:
    """(kid, alg, private key) of the store's one signing key, unsealed as an operator could."""
    with contextlib.closing(sqlite3.connect(directory / "gateway.db")) as db:
        rows = db.execute("SELECT kid, alg, sealed FROM signing_keys").fetchall()
    ((kid, alg, sealed),) = rows
    secret = signing.secret_from_text((directory / "gateway.secret").read_text())
    return kid, alg, signing.unseal(bytes(sealed), kid, secret)


def jws(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS with exactly `header`, signed by `sign` (None: empty signature)."""
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode()
    signature = b"" if sign is None else sign(signing_input)
    return f"{head}.{body}.{b64url(signature)}"


def signer(alg: str, key: Any) -> Callable[[bytes], bytes]:
    algorithm = jwt.get_algorithm_by_name(alg)
    return lambda message: algorithm.sign(message, key)


# -- 1. the whole flow, and revocation, on both stores ---------------------------------


async def test_asa_flow_and_every_revocation_on_this_and_another_instance(
    tmp_path: Path, store_url: str, upstream: TestServer
) -> None:
    backend = make_url(store_url).get_backend_name()
    config = write_config(tmp_path, store_url=store_url, upstream_url=str(upstream.make_url("")).rstrip("/"))
    secret_of_admin = await admin_token(store_url)
    cli_ok(config, "user", "create", "svc", "--roles", "writer")
    count = 2 if backend == "postgresql" else 1
    delays: dict[str, float] = {}
    async with aiohttp.ClientSession() as session, started(config, secret_of_admin, session, count) as gws:
        first = gws[0]

        async def refused_everywhere(
            label: str, bearer: str, status: int, error: str | None, method: str = "GET"
        ) -> None:
            for index, one in enumerate(gws):

                async def refused(one: Gw = one) -> bool:
                    reply = await one.proxy(bearer, method)
                    assert reply.status != 500, reply.text
                    return reply.status == status and (error is None or reply.body["error"] == error)

                delays[f"{label}@{index}"] = await delay_until(refused)
                assert delays[f"{label}@{index}"] <= FRESHNESS_SECONDS, (
                    f"{label}: instance {index} still accepts after {FRESHNESS_SECONDS:g} s"
                )

        # Create a key with the CLI; the secret is shown once, `key list` never shows it.
        key_id, key_secret = cli_key(config, "svc", "--description", "ci runner")
        assert key_id.startswith("key_") and tokens.is_well_formed(key_secret, tokens.KEY_PREFIX)
        listed = json.loads(cli_ok(config, "key", "list", "--user", "svc", "--format", "json"))
        assert [item["id"] for item in listed["items"]] == [key_id]
        assert listed["items"][0]["description"] == "ci runner" and listed["items"][0]["expired"] is False
        assert key_secret not in json.dumps(listed)

        # Exchange it with HTTP Basic and with form fields.
        before = int(time.time())
        by_basic = await first.exchange(authorization=basic(key_id, key_secret))
        by_form = await first.exchange(form_credentials(key_id, key_secret))
        after = int(time.time()) + 1
        for reply in (by_basic, by_form):
            assert reply.status == 200, reply.text
            assert reply.headers["Cache-Control"] == "no-store" and reply.headers["Pragma"] == "no-cache"
            assert set(reply.body) == {"access_token", "token_type", "expires_in", "scope"}
            assert reply.body["token_type"] == "Bearer" and reply.body["scope"] == "writer"
            header, claims = unverified(reply.body["access_token"])
            assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"].startswith("sk_")
            assert claims["iss"] == "gateway" and claims["aud"] == "gateway" and claims["sub"] == "svc"
            assert claims["client_id"] == key_id and claims["key_id"] == key_id
            assert claims["roles"] == ["writer"]
            assert before <= claims["iat"] <= after and claims["exp"] == claims["iat"] + 3600
            assert reply.body["expires_in"] == 3600 and claims["jti"]
            assert key_secret not in reply.text
        assert (
            unverified(by_basic.body["access_token"])[1]["jti"]
            != unverified(by_form.body["access_token"])[1]["jti"]
        )

        bearer = by_basic.body["access_token"]
        for one in gws:
            seen = await one.proxy(bearer)
            assert seen.status == 200, seen.text
            sent = upstream_headers(seen)
            assert sent["x-service-user"] == "svc"
            assert sent["x-service-user-roles"] == "writer"
            assert sent["x-service-token-id"] == key_id
            assert "authorization" not in sent
            assert (await one.proxy(by_form.body["access_token"], "POST")).status == 200

        # `gateway key expire`: refused within a second on every instance; the key no longer exchanges.
        cli_ok(config, "key", "expire", key_id)
        await refused_everywhere("cli key expire", bearer, 401, "token_expired")
        refused = await first.exchange(authorization=basic(key_id, key_secret))
        assert refused.status == 401 and refused.body["error"] == "invalid_client", refused.text

        # Expired through this instance's admin API: the very next request here is refused.
        other_id, other_secret = await first.key("svc")
        other = await first.mint(other_id, other_secret)
        for one in gws:
            assert (await one.proxy(other)).status == 200
        expired = await first.admin("POST", f"/v1/service-users/svc/keys/{other_id}/expire")
        assert expired.status == 200 and expired.body["expired"] is True
        at_once = await first.proxy(other)
        assert at_once.status == 401 and at_once.body["error"] == "token_expired", at_once.text
        await refused_everywhere("api key expire", other, 401, "token_expired")

        # `gateway key delete`.
        gone_id, gone_secret = await first.key("svc")
        gone = await first.mint(gone_id, gone_secret)
        for one in gws:
            assert (await one.proxy(gone)).status == 200
        cli_ok(config, "key", "delete", gone_id)
        await refused_everywhere("cli key delete", gone, 401, None)

        # `gateway user update NAME --disable`.
        await first.user("svc-off", ["writer"])
        off = await first.mint(*await first.key("svc-off"))
        for one in gws:
            assert (await one.proxy(off)).status == 200
        cli_ok(config, "user", "update", "svc-off", "--disable")
        await refused_everywhere("cli user disable", off, 401, None)

        # `gateway user delete`.
        await first.user("svc-gone", ["writer"])
        deleted = await first.mint(*await first.key("svc-gone"))
        for one in gws:
            assert (await one.proxy(deleted)).status == 200
        cli_ok(config, "user", "delete", "svc-gone")
        await refused_everywhere("cli user delete", deleted, 401, None)

        # `gateway user update NAME --remove-roles writer`: the role leaves the minted token too.
        await first.user("svc-demoted", ["writer", "other"])
        demoted = await first.mint(*await first.key("svc-demoted"))
        for one in gws:
            assert (await one.proxy(demoted, "POST")).status == 200
        cli_ok(config, "user", "update", "svc-demoted", "--remove-roles", "writer")
        await refused_everywhere("cli remove role", demoted, 403, "forbidden", method="POST")
        for one in gws:
            kept = await one.proxy(demoted, path="/echo/deep/x")  # `other` still carried
            assert kept.status == 200, kept.text
            assert upstream_headers(kept)["x-service-user-roles"] == "other"

        logs = "".join(one.process.logs() for one in gws)
    report = ", ".join(f"{label} {delay:.3f} s" for label, delay in delays.items())
    print(f"revocation delays on {backend}: {report}")
    assert all(delay <= FRESHNESS_SECONDS for delay in delays.values()), report
    assert key_secret not in logs and other_secret not in logs and gone_secret not in logs


# -- 2. exchange refusals ----------------------------------------------------------------


async def test_exchange_refusals_carry_the_rfc_status_and_code(gw: Gw) -> None:
    key_id, secret = await gw.key("svc", description="good")
    reader_id, reader_secret = await gw.key("svc", roles=["reader"])
    expired_id, expired_secret = await gw.key("svc")
    assert (await gw.admin("POST", f"/v1/service-users/svc/keys/{expired_id}/expire")).status == 200
    deleted_id, deleted_secret = await gw.key("svc")
    assert (await gw.admin("DELETE", f"/v1/service-users/svc/keys/{deleted_id}")).status == 204
    await gw.user("svc-off", ["writer"])
    off_id, off_secret = await gw.key("svc-off")
    assert (await gw.admin("PATCH", "/v1/service-users/svc-off", {"disabled": True})).status == 200
    stranger = tokens.generate(tokens.KEY_PREFIX)  # well formed, checksum right, in no store
    good = basic(key_id, secret)
    flipped = secret[:-1] + ("x" if secret[-1] != "x" else "y")
    every_secret = [secret, reader_secret, expired_secret, deleted_secret, off_secret, stranger]

    assert (await gw.exchange(authorization=good)).status == 200  # the baseline works

    def b64(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    unauthorised: dict[str, Callable[[], Awaitable[Reply]]] = {
        "wrong secret": lambda: gw.exchange(authorization=basic(key_id, stranger)),
        "another key's secret": lambda: gw.exchange(authorization=basic(key_id, reader_secret)),
        "bad checksum": lambda: gw.exchange(authorization=basic(key_id, flipped)),
        "wrong secret (form)": lambda: gw.exchange(form_credentials(key_id, stranger)),
        "unknown key id": lambda: gw.exchange(authorization=basic("key_" + "A" * 16, secret)),
        "expired key": lambda: gw.exchange(authorization=basic(expired_id, expired_secret)),
        "deleted key": lambda: gw.exchange(authorization=basic(deleted_id, deleted_secret)),
        "disabled user": lambda: gw.exchange(authorization=basic(off_id, off_secret)),
        "disabled user (form)": lambda: gw.exchange(form_credentials(off_id, off_secret)),
        "no credentials": lambda: gw.exchange(),
    }
    bad_requests: dict[str, tuple[str, Callable[[], Awaitable[Reply]]]] = {
        "Basic not base64": ("invalid_request", lambda: gw.exchange(authorization="Basic %%%not-base64%%%")),
        "Basic without colon": ("invalid_request", lambda: gw.exchange(authorization=b64(key_id + secret))),
        "Basic and form": (
            "invalid_request",
            lambda: gw.exchange(form_credentials(key_id, secret), authorization=good),
        ),
        "query string": (
            "invalid_request",
            lambda: gw.exchange(authorization=good, query="?client_secret=" + secret),
        ),
        "empty query string": ("invalid_request", lambda: gw.exchange(authorization=good, query="?x")),
        "missing grant_type": ("invalid_request", lambda: gw.exchange("scope=writer", authorization=good)),
        "repeated grant_type": (
            "invalid_request",
            lambda: gw.exchange(GRANT + "&" + GRANT, authorization=good),
        ),
        "repeated client_id": (
            "invalid_request",
            lambda: gw.exchange(form_credentials(key_id, secret, "&client_id=" + key_id)),
        ),
        "half the form credentials": ("invalid_request", lambda: gw.exchange(GRANT + "&client_id=" + key_id)),
        "grant_type=password": (
            "unsupported_grant_type",
            lambda: gw.exchange(
                f"grant_type=password&username=svc&password={quote_plus(secret)}", authorization=good
            ),
        ),
        "scope the user lacks": (
            "invalid_scope",
            lambda: gw.exchange(GRANT + "&scope=other", authorization=good),
        ),
        "scope the key lacks": (
            "invalid_scope",
            lambda: gw.exchange(GRANT + "&scope=writer", authorization=basic(reader_id, reader_secret)),
        ),
        "scope of an unknown role": (
            "invalid_scope",
            lambda: gw.exchange(GRANT + "&scope=nosuch", authorization=good),
        ),
        "empty scope": ("invalid_scope", lambda: gw.exchange(GRANT + "&scope=", authorization=good)),
        "JSON body": (
            "invalid_request",
            lambda: gw.exchange(
                json.dumps({"grant_type": "client_credentials"}),
                authorization=good,
                content_type="application/json",
            ),
        ),
        "no Content-Type": ("invalid_request", lambda: gw.exchange(authorization=good, content_type=None)),
        "body over 8 KiB": (
            "invalid_request",
            lambda: gw.exchange(GRANT + "&pad=" + "a" * 8192, authorization=good),
        ),
    }
    for label, send in unauthorised.items():
        reply = await send()
        assert reply.status == 401, f"{label}: {reply.status} {reply.text}"
        assert reply.body["error"] == "invalid_client", f"{label}: {reply.text}"
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="gateway"', label
        assert reply.headers["Cache-Control"] == "no-store", label
        assert "access_token" not in reply.body
    for label, (code, send) in bad_requests.items():
        reply = await send()
        assert reply.status == 400, f"{label}: {reply.status} {reply.text}"
        assert reply.body["error"] == code, f"{label}: {reply.text}"
        assert isinstance(reply.body["error_description"], str) and reply.body["error_description"]
        assert reply.headers["Cache-Control"] == "no-store", label
        assert "access_token" not in reply.body

    # A body over 8 KiB sent chunked (no Content-Length) is refused the same way.
    async def chunks() -> AsyncIterator[bytes]:
        yield (GRANT + "&pad=").encode()
        for _ in range(9):
            yield b"a" * 1024

    async with gw.session.post(
        gw.process.proxy + TOKEN, data=chunks(), headers={"Content-Type": FORM, "Authorization": good}
    ) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"

    for method in ("GET", "PUT", "DELETE"):
        wrong = await gw.exchange(authorization=good, method=method)
        assert wrong.status == 405 and wrong.headers["Allow"] == "POST", f"{method}: {wrong.text}"

    # Still exchangeable after all that (no lock-out of a valid client by its own mistakes).
    assert (await gw.exchange(authorization=good)).status == 200

    # No secret, and no Basic credential carrying one, reaches the log (flushed every second).
    lines: list[dict[str, Any]] = []
    for _ in range(40):
        lines = [json.loads(line) for line in gw.process.logs().splitlines() if line.startswith("{")]
        if sum(1 for line in lines if line.get("path") == TOKEN) >= len(unauthorised) + len(bad_requests) + 6:
            break
        await asyncio.sleep(0.1)
    logged = gw.process.logs()
    assert sum(1 for line in lines if line.get("path") == TOKEN) >= len(unauthorised) + len(bad_requests)
    assert all(line.get("status") != 500 for line in lines)
    for value in every_secret:
        assert value not in logged and quote_plus(value) not in logged
        assert basic(key_id, value).split()[1] not in logged
    assert "client_secret" not in logged


# -- 3. JWT refusals on the proxy -----------------------------------------------------------


async def test_forged_and_broken_jwts_are_refused(gw: Gw, tmp_path: Path, upstream: TestServer) -> None:
    key_id, secret = await gw.key("svc")
    valid = await gw.mint(key_id, secret)
    kid, alg, private = signing_material(tmp_path)
    assert alg == "ES256" and isinstance(private, ec.EllipticCurvePrivateKey)
    real = signer("ES256", private)
    header = {"alg": "ES256", "kid": kid, "typ": "at+jwt"}
    now = int(time.time())
    claims = {
        "iss": "gateway",
        "aud": "gateway",
        "sub": "svc",
        "client_id": key_id,
        "key_id": key_id,
        "roles": ["writer"],
        "iat": now,
        "exp": now + 600,
        "jti": secrets.token_urlsafe(16),
    }

    def real_key(head: dict[str, Any] | None = None, drop: tuple[str, ...] = (), **changes: Any) -> str:
        """Signed with the gateway's own key: only what was changed can make it invalid."""
        body = {k: v for k, v in {**claims, **changes}.items() if k not in drop}
        return jws({**header, **(head or {})}, body, real)

    # The forgery machinery is sound: the same claims, signed here with the real key, are accepted.
    forged_ok = await gw.proxy(real_key())
    assert forged_ok.status == 200, forged_ok.text

    attacker = ec.generate_private_key(ec.SECP256R1())
    attacker_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    public_pem = signing.public_pem(private).encode()
    head_b64, body_b64, sig_b64 = valid.split(".")
    raised = {**unverified(valid)[1], "roles": ["service-user-project-admin"]}
    tampered = f"{head_b64}.{b64url(json.dumps(raised).encode())}.{sig_b64}"
    await gw.key("svc")  # the store holds more than one key

    forgeries: dict[str, tuple[str, str]] = {
        "alg none": ("invalid_token", jws({**header, "alg": "none"}, claims, None)),
        "alg none, no kid": ("invalid_token", jws({"alg": "none", "typ": "at+jwt"}, claims, None)),
        "HS256 with the public key as secret": (
            "invalid_token",
            jws(
                {**header, "alg": "HS256"}, claims, lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()
            ),
        ),
        "tampered roles": ("invalid_token", tampered),
        "signature of another token": (
            "invalid_token",
            f"{real_key().rsplit('.', 1)[0]}.{real_key(sub='svc', jti='x').rsplit('.', 1)[1]}",
        ),
        "jku header": ("invalid_token", real_key({"jku": "https://evil.example/jwks.json"})),
        "jwk header (the real key's)": (
            "invalid_token",
            real_key({"jwk": json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))}),
        ),
        "jwk header (an attacker's, signed by it)": (
            "invalid_token",
            jws({**header, "jwk": attacker_jwk}, claims, signer("ES256", attacker)),
        ),
        "x5u header": ("invalid_token", real_key({"x5u": "https://evil.example/cert.pem"})),
        "x5c header": ("invalid_token", real_key({"x5c": [base64.b64encode(b"not a cert").decode()]})),
        "x5t header": ("invalid_token", real_key({"x5t": b64url(b"thumbprint")})),
        "crit header": ("invalid_token", real_key({"crit": ["b64"], "b64": True})),
        "crit header (unknown extension)": ("invalid_token", real_key({"crit": ["exp"]})),
        "unknown kid": ("invalid_token", real_key({"kid": "sk_" + secrets.token_urlsafe(12)})),
        "no kid": ("invalid_token", jws({"alg": "ES256", "typ": "at+jwt"}, claims, real)),
        "attacker key under the real kid": ("invalid_token", jws(header, claims, signer("ES256", attacker))),
        "EdDSA under the ES256 kid": (
            "invalid_token",
            jws({**header, "alg": "EdDSA"}, claims, signer("EdDSA", ed25519.Ed25519PrivateKey.generate())),
        ),
        "wrong iss": ("invalid_token", real_key(iss="https://evil.example")),
        "wrong aud": ("invalid_token", real_key(aud="someone-else")),
        "aud list without ours": ("invalid_token", real_key(aud=["someone-else"])),
        "typ JWT": ("invalid_token", real_key({"typ": "JWT"})),
        "no typ": ("invalid_token", jws({"alg": "ES256", "kid": kid}, claims, real)),
        "typ of an assertion": ("invalid_token", real_key({"typ": "gateway-assertion+jwt"})),
        "expired": ("token_expired", real_key(iat=now - 7200, exp=now - 3600)),
        "iat in the future": ("invalid_token", real_key(iat=now + 600, exp=now + 1200)),
        "expired 10 s ago (beyond the 5 s leeway)": ("token_expired", real_key(iat=now - 600, exp=now - 10)),
        "iat 10 s in the future": ("invalid_token", real_key(iat=now + 10, exp=now + 600)),
        "nbf in the future": ("invalid_token", real_key(nbf=now + 600)),
        "missing jti": ("invalid_token", real_key(drop=("jti",))),
        "missing sub": ("invalid_token", real_key(drop=("sub",))),
        "missing key_id": ("invalid_token", real_key(drop=("key_id",))),
        "missing exp": ("invalid_token", real_key(drop=("exp",))),
        "missing iat": ("invalid_token", real_key(drop=("iat",))),
        "key_id of no key": (
            "invalid_token",
            real_key(key_id="key_" + "B" * 16, client_id="key_" + "B" * 16),
        ),
        "key_id and client_id differ": ("invalid_token", real_key(client_id="key_" + "C" * 16)),
        "sub not the key's user": ("invalid_token", real_key(sub="root")),
        "roles not a list": ("invalid_token", real_key(roles="writer")),
        "not a JWT at all": ("invalid_token", "a.b.c"),
    }
    seen_before = len(upstream.app[SEEN])
    for label, (error, forged) in forgeries.items():
        for method in ("GET", "POST"):
            reply = await gw.proxy(forged, method)
            assert reply.status == 401, f"{label} ({method}): {reply.status} {reply.text}"
            assert reply.body["error"] == error, f"{label}: {reply.text}"
    # A gwk_ key secret is never a bearer credential, even right after an exchange has left the
    # key's identity in the token cache under the secret's digest.
    await gw.mint(key_id, secret)
    for method in ("GET", "POST"):
        as_bearer = await gw.proxy(secret, method)
        assert as_bearer.status == 401 and as_bearer.body["error"] == "invalid_token", as_bearer.text
    assert len(upstream.app[SEEN]) == seen_before  # nothing forged was forwarded

    # The admin listener takes gw_ admin tokens only: a valid access token is refused there.
    assert (await gw.proxy(valid)).status == 200
    for path in ("/v1/service-users", "/v1/service-users/svc/keys", "/v1/audit-events"):
        refused = await gw.admin("GET", path, bearer=valid)
        assert refused.status == 401, f"{path}: {refused.status} {refused.text}"

    logged = gw.process.logs()
    assert secret not in logged and valid not in logged and sig_b64 not in logged


def _padded(claims: dict[str, Any], size: int) -> dict[str, Any]:
    return {**claims, "pad": "p" * size}


async def test_a_jwt_just_under_the_header_limit_still_works(gw: Gw, tmp_path: Path) -> None:
    key_id, secret = await gw.key("svc")
    kid, _, private = signing_material(tmp_path)
    now = int(time.time())
    claims = {
        "iss": "gateway", "aud": "gateway", "sub": "svc", "client_id": key_id, "key_id": key_id,
        "roles": ["writer"], "iat": now, "exp": now + 600, "jti": "j",
    }  # fmt: skip
    header = {"alg": "ES256", "kid": kid, "typ": "at+jwt"}
    base = len(jws(header, _padded(claims, 0), signer("ES256", private)))
    # "Authorization: Bearer <jwt>" must fit aiohttp's 8190-byte header field.
    size = (8190 - len("Bearer ") - base) * 3 // 4 - 4
    fitting = jws(header, _padded(claims, size), signer("ES256", private))
    assert 8000 < len(fitting) <= 8190 - len("Bearer ")
    reply = await gw.proxy(fitting)
    assert reply.status == 200, reply.text


async def test_a_jwt_over_8_kib_is_a_refusal_never_a_500(
    gw: Gw, tmp_path: Path, upstream: TestServer
) -> None:
    key_id, _ = await gw.key("svc")
    kid, _, private = signing_material(tmp_path)
    now = int(time.time())
    claims = {
        "iss": "gateway", "aud": "gateway", "sub": "svc", "client_id": key_id, "key_id": key_id,
        "roles": ["writer"], "iat": now, "exp": now + 600, "jti": "j",
    }  # fmt: skip
    big = jws({"alg": "ES256", "kid": kid, "typ": "at+jwt"}, _padded(claims, 9000), signer("ES256", private))
    assert len(big) > 8192
    seen_before = len(upstream.app[SEEN])
    reply = await gw.proxy(big)
    assert reply.status in (400, 401, 431), reply.text
    assert big not in gw.process.logs()
    assert len(upstream.app[SEEN]) == seen_before


async def test_a_jwt_over_8_kib_is_refused_by_the_header_limit(gw: Gw, tmp_path: Path) -> None:
    """An Authorization line over 8190 bytes never reaches the JWT check: the proxy's HTTP parser
    refuses it first (400, README "API keys and short-lived tokens"), so nothing is forwarded."""
    key_id, _ = await gw.key("svc")
    kid, _, private = signing_material(tmp_path)
    now = int(time.time())
    claims = {
        "iss": "gateway", "aud": "gateway", "sub": "svc", "client_id": key_id, "key_id": key_id,
        "roles": ["writer"], "iat": now, "exp": now + 600, "jti": "j",
    }  # fmt: skip
    big = jws({"alg": "ES256", "kid": kid, "typ": "at+jwt"}, _padded(claims, 9000), signer("ES256", private))
    reply = await gw.proxy(big)
    assert reply.status == 400 and reply.body["error"] == "bad_request", reply.text
    assert big not in gw.process.logs()


# -- 4. scope, and exp never past the key's expiry --------------------------------------------


async def test_scope_narrows_roles_and_exp_stops_at_the_key_expiry(gw: Gw) -> None:
    key_id, secret = await gw.key("svc")
    narrowed = await gw.exchange(GRANT + "&scope=reader", authorization=basic(key_id, secret))
    assert narrowed.status == 200, narrowed.text
    assert narrowed.body["scope"] == "reader"
    reader = narrowed.body["access_token"]
    assert unverified(reader)[1]["roles"] == ["reader"]
    got = await gw.proxy(reader)
    assert got.status == 200 and upstream_headers(got)["x-service-user-roles"] == "reader"
    posted = await gw.proxy(reader, "POST")
    assert posted.status == 403 and posted.body["error"] == "forbidden", posted.text

    both = await gw.exchange(
        GRANT + "&scope=" + quote_plus("writer reader writer"), authorization=basic(key_id, secret)
    )
    assert both.status == 200, both.text
    assert sorted(both.body["scope"].split()) == ["reader", "writer"]
    assert sorted(unverified(both.body["access_token"])[1]["roles"]) == ["reader", "writer"]
    assert (await gw.proxy(both.body["access_token"], "POST")).status == 200

    # A key restricted to reader: its tokens carry reader only, with or without scope.
    restricted = await gw.mint(*await gw.key("svc", roles=["reader"]))
    assert unverified(restricted)[1]["roles"] == ["reader"]
    assert (await gw.proxy(restricted, "POST")).status == 403

    # A key expiring in 60 s: no token outlives it.
    expires_at = datetime.now(UTC) + timedelta(seconds=60)
    short_id, short_secret = await gw.key("svc", expires_at=expires_at.isoformat().replace("+00:00", "Z"))
    listed = await gw.admin("GET", "/v1/service-users/svc/keys")
    (stored,) = [item["expires_at"] for item in listed.body["items"] if item["id"] == short_id]
    key_expiry = datetime.fromisoformat(stored.replace("Z", "+00:00")).timestamp()
    for scope in (None, "reader"):
        extra = "" if scope is None else "&scope=" + scope
        short = await gw.exchange(GRANT + extra, authorization=basic(short_id, short_secret))
        assert short.status == 200, short.text
        claims = unverified(short.body["access_token"])[1]
        assert 0 < short.body["expires_in"] <= 60
        assert claims["exp"] <= key_expiry
        assert claims["exp"] - claims["iat"] == short.body["expires_in"]


# -- 5. JWKS --------------------------------------------------------------------------------


async def test_jwks_publishes_one_public_p256_key_that_verifies_minted_tokens(gw: Gw) -> None:
    published = await request(gw.session, "GET", gw.process.proxy + JWKS)
    assert published.status == 200, published.text
    directives = [part.strip() for part in published.headers["Cache-Control"].split(",")]
    (max_age,) = [int(d.removeprefix("max-age=")) for d in directives if d.startswith("max-age=")]
    assert 0 < max_age <= 300
    (entry,) = published.body["keys"]
    assert set(entry) <= {"kid", "kty", "crv", "x", "y", "alg", "use"}
    assert (
        entry["kty"] == "EC" and entry["crv"] == "P-256" and entry["alg"] == "ES256" and entry["use"] == "sig"
    )
    assert "d" not in entry and entry["kid"].startswith("sk_")
    on_admin = await request(gw.session, "GET", gw.process.admin + "/jwks.json")
    assert on_admin.status == 200 and on_admin.body == published.body

    key_id, secret = await gw.key("svc")
    token = await gw.mint(key_id, secret)
    assert jwt.get_unverified_header(token)["kid"] == entry["kid"]
    public = jwt.PyJWK(entry).key
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="gateway", issuer="gateway")
    assert claims["sub"] == "svc" and claims["key_id"] == key_id
    # A forged copy does not verify against it.
    head, body, sig = token.split(".")
    other = b64url(json.dumps({**claims, "sub": "root"}).encode())
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(f"{head}.{other}.{sig}", public, algorithms=["ES256"], audience="gateway")


# -- 6. secrets at rest -----------------------------------------------------------------------


async def test_signing_secrets_at_rest_and_a_second_instance(tmp_path: Path, upstream: TestServer) -> None:
    config, store_url = sqlite_config(tmp_path, upstream)
    secret_of_admin = await admin_token(store_url)  # opens the store, never the key ring
    secret_file = tmp_path / "gateway.secret"
    assert not secret_file.exists()
    async with aiohttp.ClientSession() as session:
        async with started(config, secret_of_admin, session) as (first,):
            assert secret_file.exists()
            assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
            before = (secret_file.read_text(), secret_file.stat().st_ino, secret_file.stat().st_mtime_ns)
            await first.user("svc", ["writer"])
            minted = await first.mint(*await first.key("svc"))
            assert (await first.proxy(minted)).status == 200
            first_jwks = (await request(session, "GET", first.process.proxy + JWKS)).body

            kid, _, private = signing_material(tmp_path)
            with contextlib.closing(sqlite3.connect(tmp_path / "gateway.db")) as db:
                rows = db.execute("SELECT kid, public_pem, sealed FROM signing_keys").fetchall()
            ((row_kid, public_pem, sealed),) = rows
            sealed = bytes(sealed)
            assert row_kid == kid and public_pem == signing.public_pem(private)
            der = private.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            legacy = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            scalar = private.private_numbers().private_value.to_bytes(32, "big")
            at_rest = b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db*"))
            for plain in (der, pem, legacy, scalar, b"PRIVATE KEY", before[0].strip().encode()):
                assert plain not in sealed
                assert plain not in at_rest
            # Bound to its kid: the sealed blob does not open under another kid, nor another secret.
            with pytest.raises(signing.SealError):
                signing.unseal(sealed, "sk_other", signing.secret_from_text(before[0]))
            with pytest.raises(signing.SealError):
                signing.unseal(sealed, kid, signing.secret_from_text(signing.new_secret_text()))

            async with started(config, secret_of_admin, session) as (second,):
                after = (secret_file.read_text(), secret_file.stat().st_ino, secret_file.stat().st_mtime_ns)
                assert after == before
                assert sorted(p.name for p in tmp_path.iterdir() if "secret" in p.name) == ["gateway.secret"]
                with contextlib.closing(sqlite3.connect(tmp_path / "gateway.db")) as db:
                    assert db.execute("SELECT count(*) FROM signing_keys").fetchone() == (1,)
                seen = await second.proxy(minted)
                assert seen.status == 200, seen.text
                assert (await request(session, "GET", second.process.proxy + JWKS)).body == first_jwks
                by_second = await second.mint(*await second.key("svc"))
                assert (await first.proxy(by_second)).status == 200
                second_logs = second.process.logs()
            first_logs = first.process.logs()
    assert first_logs.count("created the signing secret") == 1
    assert "created the signing secret" not in second_logs
    for logs in (first_logs, second_logs):
        assert before[0].strip() not in logs and "PRIVATE KEY" not in logs


# -- 7. the admin API's keys -------------------------------------------------------------------


async def test_admin_api_keys_create_list_expire_delete_and_audit(gw: Gw) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    created = await gw.admin(
        "POST",
        "/v1/service-users/svc/keys",
        {"description": "deploy bot", "expires_at": expires.isoformat(), "roles": ["reader"]},
    )
    assert created.status == 201, created.text
    assert created.headers["Cache-Control"] == "no-store"
    key = created.body
    key_id, secret = key["id"], key["secret"]
    assert key_id.startswith("key_") and tokens.is_well_formed(secret, tokens.KEY_PREFIX)
    assert key["user"] == "svc" and key["description"] == "deploy bot" and key["roles"] == ["reader"]
    assert key["expired"] is False and key["created_by"] == "root" and key["last_used_at"] is None
    assert datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00")) == expires

    listed = await gw.admin("GET", "/v1/service-users/svc/keys")
    assert listed.status == 200
    (item,) = listed.body["items"]
    assert "secret" not in item and secret not in listed.text
    assert {k: v for k, v in key.items() if k != "secret"} == item

    token = await gw.mint(key_id, secret)
    assert unverified(token)[1]["roles"] == ["reader"]
    assert (await gw.proxy(token)).status == 200

    expired = await gw.admin("POST", f"/v1/service-users/svc/keys/{key_id}/expire")
    assert expired.status == 200 and expired.body["expired"] is True and "secret" not in expired.body
    assert (await gw.proxy(token)).status == 401
    assert (await gw.exchange(authorization=basic(key_id, secret))).status == 401

    deleted = await gw.admin("DELETE", f"/v1/service-users/svc/keys/{key_id}")
    assert deleted.status == 204
    assert (await gw.admin("GET", "/v1/service-users/svc/keys")).body["items"] == []
    assert (await gw.admin("DELETE", f"/v1/service-users/svc/keys/{key_id}")).status == 404
    assert (await gw.admin("POST", f"/v1/service-users/svc/keys/{key_id}/expire")).status == 404
    assert (await gw.admin("POST", "/v1/service-users/nobody/keys", {})).status == 404

    # Admin identities cannot hold keys.
    refused = await gw.admin("POST", "/v1/service-users/root/keys", {"description": "nope"})
    assert refused.status == 422, refused.text
    assert refused.body["error"] == "invalid" and "secret" not in refused.body
    # Nor roles the user does not hold, nor an expiry in the past.
    assert (await gw.admin("POST", "/v1/service-users/svc/keys", {"roles": ["other"]})).status == 422
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert (await gw.admin("POST", "/v1/service-users/svc/keys", {"expires_at": past})).status == 422

    audit = await gw.admin("GET", "/v1/audit-events?actor=root")
    events = [(e["action"], e["target"]) for e in audit.body["items"] if e["action"].startswith("key.")]
    target = f"key/svc/{key_id}"
    assert events == [("key.deleted", target), ("key.expired", target), ("key.created", target)]
    assert secret not in audit.text
    logged = gw.process.logs()
    assert secret not in logged and token not in logged


# -- explain, and the admin listener, must agree with the proxy on key secrets and access tokens ---


async def explained(gw: Gw, bearer: str, method: str = "GET") -> dict[str, Any]:
    reply = await gw.admin("POST", "/v1/authz/explain", {"method": method, "url": "/echo/x", "token": bearer})
    assert reply.status == 200, reply.text
    decision: dict[str, Any] = reply.body["decision"]
    return decision


async def test_a_key_secret_is_never_a_bearer_for_explain_or_the_admin_listener(gw: Gw) -> None:
    key_id, secret = await gw.key("svc")
    proxy = await gw.proxy(secret)
    assert proxy.status == 401 and proxy.body["error"] == "invalid_token"
    before = await explained(gw, secret)
    assert before["allowed"] is False and before["status"] == 401
    assert (await gw.admin("GET", "/v1/service-users", bearer=secret)).status == 401

    await gw.mint(key_id, secret)  # the exchange leaves the key's identity in the token cache

    proxy = await gw.proxy(secret)
    assert proxy.status == 401 and proxy.body["error"] == "invalid_token"
    admin = await gw.admin("GET", "/v1/service-users", bearer=secret)
    after = await explained(gw, secret)
    assert (after["allowed"], after["status"], after["error"]) == (False, 401, "invalid_token"), after
    assert (admin.status, admin.body["error"]) == (401, "invalid_token"), admin.text


async def test_explain_decides_an_access_token_as_the_proxy_does(gw: Gw) -> None:
    token = await gw.mint(*await gw.key("svc"))
    forwarded = await gw.proxy(token)
    assert forwarded.status == 200
    decision = await explained(gw, token)
    assert decision["allowed"] is True, decision
    assert (
        decision["identity_headers"]["X-Service-Token-Id"]
        == upstream_headers(forwarded)["x-service-token-id"]
    )
