"""Signing keys and the identity assertion, end to end: real `gateway serve` processes, real stores.

An upstream here checks `X-Service-User-Assertion` the way a real one would, with the
gateway's JWKS and PyJWT (no gateway code); the CLI runs as a subprocess, as an operator
runs it; the signing-key lifecycle runs on PostgreSQL with two processes sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import signing
from gateway.config import load_config
from gateway.keyring import open_ring
from gateway.store import open_store
from tests.conftest import FRESHNESS_SECONDS, eventually, fresh_pg_database, write_config
from tests.process import REPO, GatewayProcess

ASSERTION = "X-Service-User-Assertion"
ASSERTION_TYPE = "gateway-assertion+jwt"
CLAIMS = ["iss", "aud", "sub", "roles", "token_id", "method", "path", "request_id", "iat", "exp", "jti"]


def folded(name: str) -> str:
    """A header name as upstream frameworks read it: case-insensitive, '_' and '.' as '-'."""
    return name.lower().replace("_", "-").replace(".", "-")


# -- the command line -------------------------------------------------------------------


async def cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`gateway --config CONFIG ARGS…` as an operator runs it (off the event loop)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


async def cli_ok(config: Path, *args: str) -> str:
    done = await cli(config, *args)
    assert done.returncode == 0, f"gateway {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


async def api_key(config: Path, user: str = "svc") -> tuple[str, str]:
    """Create `user` (role writer) and an API key for it with the CLI: (key id, key secret)."""
    await cli_ok(config, "user", "create", user, "--roles", "writer")
    printed = await cli_ok(config, "key", "create", "--user", user)
    fields = dict(line.split(": ", 1) for line in printed.splitlines() if ": " in line)
    return fields["Key ID"].strip(), fields["Key secret"].strip()


async def signing_keys(config: Path) -> list[dict[str, Any]]:
    """`gateway signing-key list --format json`."""
    items: list[dict[str, Any]] = json.loads(await cli_ok(config, "signing-key", "list", "--format", "json"))[
        "items"
    ]
    return items


async def rotate(config: Path, *flags: str) -> str:
    """`gateway signing-key rotate [--now]`: the new kid."""
    printed = await cli_ok(config, "signing-key", "rotate", *flags)
    assert printed.startswith("Signing key added: "), printed
    return printed.removeprefix("Signing key added: ").split()[0]


# -- HTTP helpers -----------------------------------------------------------------------


async def exchange(session: aiohttp.ClientSession, proxy: str, key: tuple[str, str]) -> str:
    """An access token for `key` from POST /.gateway/token (client credentials)."""
    form = {"grant_type": "client_credentials", "client_id": key[0], "client_secret": key[1]}
    async with session.post(proxy + "/.gateway/token", data=form) as response:
        body = await response.text()
        assert response.status == 200, body
        assert response.headers["Cache-Control"] == "no-store"
        token: str = json.loads(body)["access_token"]
        return token


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


async def jwks(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
        assert all("d" not in entry for entry in document["keys"])  # never a private half
        document["cache_control"] = response.headers.get("Cache-Control")
        return document


def jwks_urls(*processes: GatewayProcess) -> list[str]:
    """Both JWKS endpoints (proxy and admin listener) of every process."""
    return [url for p in processes for url in (p.proxy + "/.gateway/jwks.json", p.admin + "/jwks.json")]


async def published_kids(session: aiohttp.ClientSession, url: str) -> set[str]:
    return {entry["kid"] for entry in (await jwks(session, url))["keys"]}


async def status_with(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def verify_with_jwks(token: str, document: dict[str, Any], *, typ: str, audience: str) -> dict[str, Any]:
    """What an upstream does with a gateway JWT: its key by kid from the JWKS, then PyJWT."""
    header = jwt.get_unverified_header(token)
    if header.get("typ") != typ:
        raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}")
    (entry,) = [key for key in document["keys"] if key["kid"] == header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(entry).key,
        algorithms=[entry["alg"]],
        audience=audience,
        issuer="gateway",
        options={"require": ["exp", "iat"]},
    )
    return claims


# -- an upstream that verifies the assertion ------------------------------------------------


@dataclass
class Verifier:
    """What the verifying upstream needs: where the JWKS is, which header, which route by base path."""

    header: str = ASSERTION
    jwks_url: str = ""
    routes: dict[str, str] = field(default_factory=dict)  # base path → route name


VERIFIER = web.AppKey("verifier", Verifier)


async def verifying_handler(request: web.Request) -> web.Response:
    """Answer with what arrived and the assertion's verified claims (401 when it does not verify)."""
    verifier = request.app[VERIFIER]
    path = request.raw_path.partition("?")[0]
    found = [value for name, value in request.headers.items() if folded(name) == folded(verifier.header)]
    answer: dict[str, Any] = {
        "raw_path": path,
        "headers": [[name, value] for name, value in request.headers.items()],
        "assertions": found,
    }
    if len(found) == 1:
        route = next(name for base, name in verifier.routes.items() if path.startswith(base + "/"))
        async with aiohttp.ClientSession() as session, session.get(verifier.jwks_url) as fetched:
            document = await fetched.json()
        try:
            claims = verify_with_jwks(found[0], document, typ=ASSERTION_TYPE, audience=f"route:{route}")
            if claims["method"] != request.method or claims["path"] != path:
                raise jwt.InvalidTokenError(f"for {claims['method']} {claims['path']}")
        except (jwt.PyJWTError, ValueError) as exc:
            answer["error"] = f"{type(exc).__name__}: {exc}"
            return web.json_response(answer, status=401)
        answer["claims"] = claims
        answer["jwt_header"] = jwt.get_unverified_header(found[0])
    return web.json_response(answer)


@pytest.fixture
async def verifying_upstream() -> AsyncIterator[tuple[TestServer, Verifier]]:
    app = web.Application()
    verifier = Verifier()
    app[VERIFIER] = verifier
    app.router.add_route("*", "/{tail:.*}", verifying_handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, verifier
    await server.close()


def assertion_config(
    directory: Path, upstream: TestServer, verifier: Verifier, *, extra_yaml: str = ""
) -> Path:
    """Routes echo (base path /base) and strip (strip_prefix, base /stripped), both `assertion: true`."""
    origin = str(upstream.make_url("")).rstrip("/")
    config = write_config(
        directory,
        store_url=f"sqlite+aiosqlite:///{directory / 'gateway.db'}",
        upstream_url=origin + "/base",
        route_options="assertion: true",
        extra_yaml=extra_yaml,
    )
    strip = f'  - name: strip\n    prefix: /strip\n    upstream: "{origin}/base"\n    strip_prefix: true\n'
    text = config.read_text()
    assert strip in text
    config.write_text(text.replace(strip, strip.replace("/base", "/stripped") + "    assertion: true\n"))
    verifier.routes.update({"/base": "echo", "/stripped": "strip"})
    return config


@contextlib.asynccontextmanager
async def running(config: Path, **options: Any) -> AsyncIterator[GatewayProcess]:
    """A ready `gateway serve` child on `config`, stopped afterwards."""
    process = GatewayProcess(config, **options)
    try:
        await process.wait_ready()
        yield process
    finally:
        process.stop()


async def failed_start(config: Path, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start `gateway serve`, which must exit by itself: (exit code, everything it logged)."""
    process = GatewayProcess(config, extra_env=extra_env)
    try:
        code = await asyncio.to_thread(process.process.wait, 30)
        return code, process.logs()
    finally:
        process.stop()


# -- 1. the assertion, checked by an upstream with the JWKS -----------------------------------


async def test_an_upstream_verifies_the_assertion_with_the_jwks(
    tmp_path: Path, verifying_upstream: tuple[TestServer, Verifier]
) -> None:
    server, verifier = verifying_upstream
    config = assertion_config(tmp_path, server, verifier)
    key = await api_key(config)
    async with running(config) as process, aiohttp.ClientSession() as session:
        verifier.jwks_url = process.proxy + "/.gateway/jwks.json"
        token = await exchange(session, process.proxy, key)
        bearer = {"Authorization": f"Bearer {token}"}

        async def through(method: str, path: str, **extra: Any) -> tuple[dict[str, Any], str]:
            headers = {**bearer, **extra.pop("headers", {})}
            async with session.request(method, process.proxy + path, headers=headers, **extra) as response:
                answer = await response.json()
                assert response.status == 200, answer
                return answer, response.headers["X-Request-Id"]

        first, _ = await through("GET", "/echo/a%20b/c?q=1", headers={"X-Request-Id": "req-assert-1"})
        assert first["raw_path"] == "/base/echo/a%20b/c"
        claims = first["claims"]
        assert first["jwt_header"]["typ"] == ASSERTION_TYPE and first["jwt_header"]["alg"] == "ES256"
        assert set(CLAIMS) <= set(claims)
        assert claims["aud"] == "route:echo" and claims["iss"] == "gateway"
        assert claims["method"] == "GET" and claims["path"] == "/base/echo/a%20b/c"
        assert claims["sub"] == "svc" and claims["token_id"] == key[0] and "writer" in claims["roles"]
        upstream_ids = [v for k, v in first["headers"] if k.lower() == "x-request-id"]
        assert upstream_ids == ["req-assert-1"] and claims["request_id"] == "req-assert-1"
        assert claims["exp"] - claims["iat"] == 60
        assert abs(claims["iat"] - time.time()) < 5

        # No X-Request-Id from the client: the one the gateway made is in the assertion too.
        second, answered_id = await through("GET", "/echo/a%20b/c")
        upstream_ids = [v for k, v in second["headers"] if k.lower() == "x-request-id"]
        assert upstream_ids == [answered_id] and second["claims"]["request_id"] == answered_id
        assert second["claims"]["jti"] != claims["jti"]
        assert second["claims"]["exp"] - second["claims"]["iat"] == 60

        # Another method, and a path the gateway re-encodes: the claim is what the upstream reads.
        posted, _ = await through("POST", "/echo/%7Eitems", json={"n": 1})
        assert posted["claims"]["method"] == "POST"
        assert posted["claims"]["path"] == posted["raw_path"] and posted["raw_path"].startswith("/base/echo/")

        # strip_prefix: the path after stripping, under that route's own base path.
        stripped, _ = await through("GET", "/strip/in%20ner/z?k=v")
        assert stripped["raw_path"] == "/stripped/in%20ner/z"
        assert stripped["claims"]["aud"] == "route:strip"
        assert stripped["claims"]["path"] == "/stripped/in%20ner/z"

        # A route without `assertion: true` gets none.
        plain, _ = await through("GET", "/app/x")
        assert plain["assertions"] == [] and "claims" not in plain


# -- 2. no client copy, none on a public rule, never a credential -----------------------------


def spellings(name: str) -> list[str]:
    """`name` as a client may spell it to slip past a case-sensitive filter."""
    return [name, name.lower().replace("-", "_"), name.replace("-", ".")]


@pytest.mark.parametrize("header", [ASSERTION, "X-Gw-Assertion"], ids=["default-name", "renamed"])
async def test_client_assertions_are_stripped_and_never_a_credential(
    tmp_path: Path, verifying_upstream: tuple[TestServer, Verifier], header: str
) -> None:
    server, verifier = verifying_upstream
    verifier.header = header
    renamed = "" if header == ASSERTION else f"identity:\n  assertion_header: {header}\n"
    config = assertion_config(tmp_path, server, verifier, extra_yaml=renamed)
    key = await api_key(config)
    forged = [
        (name, f"forged-{index}") for index, name in enumerate(spellings(header) + spellings(ASSERTION))
    ]
    async with running(config) as process, aiohttp.ClientSession() as session:
        verifier.jwks_url = process.proxy + "/.gateway/jwks.json"
        token = await exchange(session, process.proxy, key)
        headers = [("Authorization", f"Bearer {token}"), *forged]
        async with session.get(process.proxy + "/echo/x", headers=headers) as response:
            answer = await response.json()
            assert response.status == 200, answer
        # Exactly one, the gateway's (it verified), and no other spelling of either name.
        assert len(answer["assertions"]) == 1 and not answer["assertions"][0].startswith("forged")
        assert answer["claims"]["path"] == "/base/echo/x"
        names = [folded(name) for name, _ in answer["headers"]]
        assert names.count(folded(header)) == 1 and names.count(folded(ASSERTION)) == (header == ASSERTION)
        assert not any(value.startswith("forged") for _, value in answer["headers"])
        assertion = answer["assertions"][0]

        # A public rule: nothing is asserted, whatever the client sends (a bearer included).
        async with session.post(process.proxy + "/echo/hook", headers=headers, data=b"{}") as hook:
            seen = await hook.json()
            assert hook.status == 200, seen
        assert seen["assertions"] == [] and "claims" not in seen
        assert not any(folded(name) in (folded(header), folded(ASSERTION)) for name, _ in seen["headers"])

        # The assertion is not a credential on the proxy.
        for path in ("/echo/x", "/strip/x"):
            async with session.get(
                process.proxy + path, headers={"Authorization": f"Bearer {assertion}"}
            ) as refused:
                assert refused.status == 401
                assert (await refused.json())["error"] == "invalid_token"


# -- 3. the lifecycle on PostgreSQL, two processes ---------------------------------------------


async def test_signing_key_lifecycle_on_postgresql_with_two_processes(
    tmp_path: Path, upstream: TestServer
) -> None:
    async with fresh_pg_database() as store_url:
        config = write_config(
            tmp_path,
            store_url=store_url,
            upstream_url=str(upstream.make_url("")).rstrip("/"),
            extra_yaml="signing: {publish_ahead: 2}\n",
        )
        key = await api_key(config)
        assert not (tmp_path / "gateway.secret").exists()
        # Both start at once on the same folder and the same empty signing-key table.
        first, second = GatewayProcess(config), GatewayProcess(config)
        processes = (first, second)
        try:
            await asyncio.gather(first.wait_ready(), second.wait_ready())
            await lifecycle(config, store_url, key, processes, tmp_path)
        finally:
            first.stop()
            second.stop()
        for process in processes:
            assert "PRIVATE KEY" not in process.log_path.read_text(errors="replace")


async def key_times(store_url: str, kid: str) -> tuple[float, float]:
    """(created_at, signs_from) of a signing key, to the microsecond, from the PostgreSQL store."""
    connection = await asyncpg.connect(store_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        row = await connection.fetchrow("SELECT created_at, signs_from FROM signing_keys WHERE kid = $1", kid)
    finally:
        await connection.close()
    assert row is not None
    return row["created_at"].timestamp(), row["signs_from"].timestamp()


async def lifecycle(
    config: Path,
    store_url: str,
    key: tuple[str, str],
    processes: tuple[GatewayProcess, GatewayProcess],
    folder: Path,
) -> None:
    first, second = processes
    assert sorted(p.name for p in folder.iterdir() if "secret" in p.name) == ["gateway.secret"]
    (only,) = await signing_keys(config)
    old = only["kid"]
    assert only["state"] == "signing"
    audit = json.loads(await cli_ok(config, "audit", "list", "--format", "json"))["items"]
    assert [e["target"] for e in audit if e["action"] == "signing_key.rotated"] == [f"signing_key/{old}"]

    async with aiohttp.ClientSession() as session:
        for url in jwks_urls(first, second):
            document = await jwks(session, url)
            assert {k["kid"] for k in document["keys"]} == {old}
            assert document["cache_control"] == "public, max-age=2"
        # Minted by one, accepted by the other.
        old_tokens = [await exchange(session, p.proxy, key) for p in processes]
        assert [kid_of(t) for t in old_tokens] == [old, old]
        for token, other in zip(old_tokens, (second, first), strict=True):
            assert (await status_with(session, other.proxy + "/echo/x", token))[0] == 200

        new = await rotate(config)
        created, starts = await key_times(store_url, new)
        assert starts - created == 2.0  # signing.publish_ahead

        async def published_everywhere() -> bool:
            return all([{old, new} <= await published_kids(session, url) for url in jwks_urls(first, second)])

        await eventually(published_everywhere, within=FRESHNESS_SECONDS)
        # Published, but not signing yet.
        assert [kid_of(await exchange(session, p.proxy, key)) for p in processes] == [old, old]
        assert time.time() < starts, "too slow for publish_ahead: 2 (the new key signs already)"

        await asyncio.sleep(max(0.0, starts + 0.05 - time.time()))
        new_tokens = [await exchange(session, p.proxy, key) for p in processes]
        assert [kid_of(t) for t in new_tokens] == [new, new]
        for process in processes:
            for token in (*old_tokens, *new_tokens):  # tokens from before still verify
                assert (await status_with(session, process.proxy + "/echo/x", token))[0] == 200
        states = {k["kid"]: k["state"] for k in await signing_keys(config)}
        assert states == {old: "retired", new: "signing"}

        await cli_ok(config, "signing-key", "revoke", old)

        async def revoked_everywhere() -> bool:
            for url in jwks_urls(first, second):
                if old in await published_kids(session, url):
                    return False
            for process in processes:
                for token in old_tokens:
                    status, body = await status_with(session, process.proxy + "/echo/x", token)
                    if status != 401:
                        return False
                    assert body["error"] == "invalid_token"
            return True

        await eventually(revoked_everywhere, within=FRESHNESS_SECONDS)
        for process in processes:
            assert await published_kids(session, process.proxy + "/.gateway/jwks.json") == {new}
            for token in new_tokens:
                assert (await status_with(session, process.proxy + "/echo/x", token))[0] == 200
    states = {k["kid"]: k["state"] for k in await signing_keys(config)}
    assert states == {old: "revoked", new: "signing"}
    assert sorted(p.name for p in folder.iterdir() if "secret" in p.name) == ["gateway.secret"]


# -- 4. rotate --now, the states, the audit trail ----------------------------------------------


async def test_rotate_now_signs_at_once_and_list_and_audit_show_it(
    tmp_path: Path, upstream: TestServer
) -> None:
    config = write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
        extra_yaml="signing: {token_ttl: 2}\n",  # a retired key is gone from the JWKS 2 s later
    )
    key = await api_key(config)
    async with running(config) as process, aiohttp.ClientSession() as session:
        (first,) = await signing_keys(config)
        old = first["kid"]
        assert first["state"] == "signing" and first["alg"] == "ES256" and first["retired_at"] is None
        assert kid_of(await exchange(session, process.proxy, key)) == old

        new = await rotate(config, "--now")
        assert old in await published_kids(session, process.admin + "/jwks.json")  # still, for its tokens

        async def new_signs() -> bool:
            token = await exchange(session, process.proxy, key)
            return (
                kid_of(token) == new
                and (await status_with(session, process.proxy + "/echo/x", token))[0] == 200
            )

        await eventually(new_signs, within=FRESHNESS_SECONDS)
        states = {k["kid"]: k["state"] for k in await signing_keys(config)}
        assert states[new] == "signing" and states[old] in ("retired", "expired")

        # token_ttl after its retirement the old key leaves the JWKS by itself, and is listed expired.
        async def old_unpublished() -> bool:
            return await published_kids(session, process.proxy + "/.gateway/jwks.json") == {new}

        await eventually(old_unpublished, within=4.0)
        assert await published_kids(session, process.admin + "/jwks.json") == {new}
        assert {k["kid"]: k["state"] for k in await signing_keys(config)} == {old: "expired", new: "signing"}

        ahead = await rotate(config)  # without --now: published (default publish_ahead 300 s), not signing

        async def ahead_published() -> bool:
            return await published_kids(session, process.admin + "/jwks.json") == {new, ahead}

        await eventually(ahead_published, within=FRESHNESS_SECONDS)
        assert kid_of(await exchange(session, process.proxy, key)) == new

        await cli_ok(config, "signing-key", "revoke", old)
        missing = await cli(config, "signing-key", "revoke", "sk_nosuchkey")
        assert missing.returncode == 1 and "sk_nosuchkey" in missing.stderr
        listed = {k["kid"]: k for k in await signing_keys(config)}
        assert {kid: k["state"] for kid, k in listed.items()} == {
            old: "revoked",
            new: "signing",
            ahead: "published",
        }
        assert listed[old]["revoked_at"] is not None and listed[new]["retired_at"] is not None
        table = await cli_ok(config, "signing-key", "list")
        assert all(state in table for state in ("revoked", "signing", "published"))

    audit = json.loads(await cli_ok(config, "audit", "list", "--format", "json"))["items"]
    rotated = {e["target"]: e for e in audit if e["action"] == "signing_key.rotated"}
    assert set(rotated) == {f"signing_key/{kid}" for kid in (old, new, ahead)}
    assert (
        rotated[f"signing_key/{old}"]["actor"] == "gateway"
        and rotated[f"signing_key/{old}"]["detail"]["first"]
    )
    assert rotated[f"signing_key/{new}"]["actor"].startswith("cli:")
    assert rotated[f"signing_key/{new}"]["detail"]["kid"] == new
    (revoked,) = [e for e in audit if e["action"] == "signing_key.revoked"]
    assert revoked["target"] == f"signing_key/{old}" and revoked["actor"].startswith("cli:")
    assert revoked["detail"] == {"kid": old}


# -- 5. the sealing secret ---------------------------------------------------------------------


async def test_the_sealing_secret(tmp_path: Path, upstream: TestServer) -> None:
    database = tmp_path / "gateway.db"
    config = write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{database}",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )
    key = await api_key(config)
    secret_file = tmp_path / "gateway.secret"
    assert not secret_file.exists()
    logs: list[str] = []
    async with running(config) as process, aiohttp.ClientSession() as session:
        token = await exchange(session, process.proxy, key)
        assert (await status_with(session, process.proxy + "/echo/x", token))[0] == 200
    logs.append(process.log_path.read_text(errors="replace"))

    # (a) Made on the first start, readable by its owner only.
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret_text = secret_file.read_text()
    secret = signing.secret_from_text(secret_text)
    (only,) = await signing_keys(config)
    kid = only["kid"]

    # (d) The store holds the private key sealed: its bytes are nowhere in the column.
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute("SELECT kid, sealed, public_pem FROM signing_keys").fetchall()
    assert [row[0] for row in rows] == [kid]
    _, sealed, public_pem = rows[0]
    private = signing.unseal(sealed, kid, secret)
    assert signing.public_pem(private) == public_pem  # the right key came out
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    scalar = private.private_numbers().private_value.to_bytes(32, "big")
    assert der not in sealed and scalar not in sealed
    stored = database.read_bytes()
    assert der not in stored and scalar not in stored and secret_text.strip().encode() not in stored
    with pytest.raises(signing.SealError):  # the kid is bound in: the blob opens for its own row only
        signing.unseal(sealed, "sk_another", secret)

    # (b) Another GATEWAY_SECRET_KEY: the process does not start, and says which key.
    code, logged = await failed_start(config, {"GATEWAY_SECRET_KEY": "w" * 40})
    logs.append(logged)
    assert code != 0 and kid in logged and "does not open" in logged
    assert secret_file.read_text() == secret_text

    # (c) The secret file gone while the store has keys: no start, no new secret.
    secret_file.unlink()
    code, logged = await failed_start(config)
    logs.append(logged)
    assert code != 0 and str(secret_file) in logged and "missing" in logged
    assert not secret_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "secret" in p.name) == []
    refused = await cli(config, "signing-key", "rotate")
    assert refused.returncode == 1 and str(secret_file) in refused.stderr
    assert [k["kid"] for k in await signing_keys(config)] == [kid]

    # The right secret given as the variable instead of the file: it starts again.
    async with running(config, extra_env={"GATEWAY_SECRET_KEY": secret_text.strip()}) as process:
        async with aiohttp.ClientSession() as session:
            assert kid_of(await exchange(session, process.proxy, key)) == kid
    logs.append(process.log_path.read_text(errors="replace"))
    assert not secret_file.exists()

    for text in logs:
        assert "PRIVATE KEY" not in text and secret_text.strip() not in text
        assert not any("PRIVATE KEY" in line for line in text.splitlines())


# -- 6. EdDSA ------------------------------------------------------------------------------


async def test_eddsa_keys_verify_with_pyjwt(
    tmp_path: Path, verifying_upstream: tuple[TestServer, Verifier]
) -> None:
    server, verifier = verifying_upstream
    config = assertion_config(tmp_path, server, verifier, extra_yaml="signing: {alg: EdDSA}\n")
    key = await api_key(config)
    async with running(config) as process, aiohttp.ClientSession() as session:
        verifier.jwks_url = process.proxy + "/.gateway/jwks.json"
        document = await jwks(session, process.admin + "/jwks.json")
        (entry,) = document["keys"]
        assert entry["kty"] == "OKP" and entry["crv"] == "Ed25519" and entry["alg"] == "EdDSA"
        assert entry["use"] == "sig" and "d" not in entry
        token = await exchange(session, process.proxy, key)
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        claims = jwt.decode(
            token, jwt.PyJWK(entry).key, algorithms=["EdDSA"], audience="gateway", issuer="gateway"
        )
        assert claims["sub"] == "svc" and claims["key_id"] == key[0]
        # The assertion is EdDSA too, and the upstream's check (alg from the JWKS) accepts it.
        async with session.get(
            process.proxy + "/echo/ed", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            answer = await response.json()
            assert response.status == 200, answer
        assert answer["jwt_header"]["alg"] == "EdDSA" and answer["claims"]["path"] == "/base/echo/ed"
    (listed,) = await signing_keys(config)
    assert listed["alg"] == "EdDSA" and listed["kid"] == entry["kid"]


# -- found while writing these (README "Command line": signing-key rotate) ----------------------


def sqlite_config(directory: Path, upstream: TestServer) -> Path:
    return write_config(
        directory,
        store_url=f"sqlite+aiosqlite:///{directory / 'gateway.db'}",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )


async def first_key(config: Path) -> str:
    """Make the store's first signing key (and gateway.secret) as `gateway serve` does at start."""
    loaded = load_config(config, env={})
    store = await open_store(loaded.store_url, migrate=True)
    try:
        ring, _ = await open_ring(store, loaded, {})
    finally:
        await store.close()
    (only,) = ring.keys
    return only.kid


async def test_rotate_now_after_a_pending_rotation_retires_the_key_that_was_signing(
    tmp_path: Path, upstream: TestServer
) -> None:
    config = sqlite_config(tmp_path, upstream)
    signing_now = await first_key(config)
    pending = await rotate(config)  # signs in 300 s; signing_now retires then
    urgent = await rotate(config, "--now")  # e.g. signing_now leaked: replace it at once
    states = {k["kid"]: k["state"] for k in await signing_keys(config)}
    assert states[pending] == "retired"  # it never got to sign
    assert [kid for kid, state in states.items() if state == "signing"] == [urgent]
    assert states[signing_now] == "retired"


async def test_rotate_with_a_secret_that_opens_no_key_is_refused(
    tmp_path: Path, upstream: TestServer
) -> None:
    config = sqlite_config(tmp_path, upstream)
    kid = await first_key(config)
    done = await cli(config, "signing-key", "rotate", "--now", env={"GATEWAY_SECRET_KEY": "w" * 40})
    assert [k["kid"] for k in await signing_keys(config)] == [kid]
    assert done.returncode == 1 and kid in done.stderr
