"""Upstream TLS: a route's `https://` upstream, its own CA, mutual TLS, SNI override, refusals, verify: false.

Every certificate is made here with `cryptography` (a CA; a server certificate for
`localhost` and 127.0.0.1; one for `upstream.test` only; an expired one; a client
certificate), written as PEM files into `tmp_path/tls/` next to gateway.yaml. The upstream
is a real aiohttp server with TLS on loopback that echoes the headers it received and
records the connections (transports) that carried requests, the SNI names offered in
handshakes, and the client certificates presented. The gateway runs in-process
(`make_harness`) with one more route, `secure` at `/secure`, whose `tls` block each test
sets.

A failed handshake is a 502 `upstream_unavailable` answer, and a `gateway.*` log record
(its message, or its extra fields) names why: unknown CA, name mismatch, expired
certificate. No log record ever carries the token.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.app import Gateway
from gateway.config import load_config
from gateway.errors import ConfigError
from tests.conftest import DEFAULT_POLICIES, Harness, write_config

SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)  # not the store's business

POLICIES = (
    DEFAULT_POLICIES
    + """\
  secure:
    rules:
      - paths: ["/secure/**"]
        require: "echo:read"
"""
)

IDENTITY_HEADERS = ("X-Service-User", "X-Service-User-Roles", "X-Service-Token-Id")


# --- certificates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: bytes  # PEM
    key: bytes  # PEM (PKCS#8, unencrypted)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> Issued:
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@functools.cache
def pki() -> dict[str, Issued]:
    """The test PKI, made once per run: ca, server, named, expired, client."""
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Gateway Test CA"))
        .issuer_name(_name("Gateway Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
    return {
        "ca": Issued(ca.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)),
        "server": _leaf(
            ca, ca_key, "localhost", dns=("localhost",), ips=("127.0.0.1",), not_before=start, not_after=end
        ),
        "named": _leaf(ca, ca_key, "upstream.test", dns=("upstream.test",), not_before=start, not_after=end),
        "expired": _leaf(
            ca,
            ca_key,
            "localhost",
            dns=("localhost",),
            ips=("127.0.0.1",),
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ),
        "client": _leaf(
            ca,
            ca_key,
            "gateway-client",
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=start,
            not_after=end,
        ),
        # A key that belongs to no certificate here.
        "stray": Issued(b"", _key_pem(_key())),
    }


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """tmp_path/tls/ with <name>.pem (certificate) and <name>.key (key) for every PKI entry."""
    directory = tmp_path / "tls"
    directory.mkdir()
    for name, issued in pki().items():
        if issued.cert:
            (directory / f"{name}.pem").write_bytes(issued.cert)
        (directory / f"{name}.key").write_bytes(issued.key)
    return directory


# --- the TLS upstream -------------------------------------------------------------------------


@dataclass
class TlsUpstream:
    port: int = 0
    connections: list[object] = field(default_factory=list)  # distinct transports that carried requests
    requests: int = 0
    server_names: list[str | None] = field(default_factory=list)  # SNI of each handshake
    client_subjects: list[str] = field(default_factory=list)  # CN of the client certificate, per request


STATE = web.AppKey("state", TlsUpstream)


async def _echo(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.requests += 1
    transport = request.transport
    if transport is not None and all(seen is not transport for seen in state.connections):
        state.connections.append(transport)
    peer = transport.get_extra_info("peercert") if transport is not None else None
    if peer:
        for rdn in peer.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    state.client_subjects.append(value)
    return web.json_response({"path": request.path, "headers": [[k, v] for k, v in request.headers.items()]})


@contextlib.asynccontextmanager
async def tls_upstream(
    tls: Path, cert: str, *, require_client_cert: bool = False
) -> AsyncIterator[TlsUpstream]:
    """A real aiohttp server on 127.0.0.1 with TLS, serving `cert` (a name in `pki()`)."""
    state = TlsUpstream()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / f"{cert}.pem", tls / f"{cert}.key")
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(tls / "ca.pem")

    def sni(_sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
        state.server_names.append(name)

    context.sni_callback = sni
    app = web.Application()
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


# --- the gateway ------------------------------------------------------------------------------


def secure_route(upstream: str, tls: dict[str, Any] | None) -> str:
    """The `secure` route item, appended to write_config's routes list (the comment defeats dedent)."""
    text = (
        "# added by test_upstream_tls\n"
        "  - name: secure\n"
        "    prefix: /secure\n"
        f'    upstream: "{upstream}"\n'
        "    timeout: 5\n"
    )
    if tls is not None:
        text += "    tls:\n" + "".join(f"      {key}: {json.dumps(value)}\n" for key, value in tls.items())
    return text


async def start(
    make_harness: Callable[..., Awaitable[Harness]], upstream: str, tls: dict[str, Any] | None
) -> tuple[Harness, str]:
    """The gateway with the `secure` route, and a token that may use it."""
    h = await make_harness(policies=POLICIES, extra_yaml=secure_route(upstream, tls))
    return h, await h.token()


async def get(h: Harness, token: str, path: str = "/secure/hello") -> tuple[int, dict[str, Any]]:
    async with await h.send("GET", path, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.json()


def header_values(body: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in body["headers"] if key.lower() == name.lower()]


_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def record_text(record: logging.LogRecord) -> str:
    """A record's message and its extra fields (what the JSON formatter writes, less the traceback)."""
    extras = {key: value for key, value in vars(record).items() if key not in _STANDARD}
    return f"{record.getMessage()} {extras!r}"


def gateway_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name.startswith("gateway")]


def assert_token_never_logged(caplog: pytest.LogCaptureFixture, token: str) -> None:
    for record in caplog.records:
        text = record_text(record)
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + repr(record.exc_info[1])
        assert token not in text, f"{record.name} logged the token"
        assert token[-12:] not in text, f"{record.name} logged part of the token"


# --- success ----------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_own_ca_forwards_identity_over_one_kept_alive_tls_connection(
    make_harness: Callable[..., Awaitable[Harness]],
    tls_dir: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with tls_upstream(tls_dir, "server") as upstream:
        h, token = await start(make_harness, f"https://{host}:{upstream.port}", {"ca_file": "tls/ca.pem"})
        for n in range(5):
            status, body = await get(h, token, f"/secure/n{n}")
            assert status == 200, body
            assert body["path"] == f"/secure/n{n}"
            assert header_values(body, "X-Service-User") == ["svc"]
            assert header_values(body, "X-Service-User-Roles") == ["writer"]
            assert len(header_values(body, "X-Service-Token-Id")) == 1
            assert header_values(body, "Authorization") == []
        assert upstream.requests == 5
        assert len(upstream.connections) == 1, "keep-alive: 5 sequential requests on one TLS connection"
        assert len(upstream.server_names) == 1, "one handshake"
        if host == "localhost":
            assert upstream.server_names == ["localhost"]  # SNI defaults to the upstream URL's host
    # verify stays on: no start-up warning about it.
    assert not [
        r
        for r in gateway_records(caplog)
        if r.levelno >= logging.WARNING and "verif" in record_text(r).lower()
    ]
    assert_token_never_logged(caplog, token)


@SQLITE_ONLY
async def test_mutual_tls_presents_the_client_certificate(
    make_harness: Callable[..., Awaitable[Harness]], tls_dir: Path
) -> None:
    async with tls_upstream(tls_dir, "server", require_client_cert=True) as upstream:
        tls = {"ca_file": "tls/ca.pem", "cert_file": "tls/client.pem", "key_file": "tls/client.key"}
        h, token = await start(make_harness, f"https://localhost:{upstream.port}", tls)
        for _ in range(3):
            status, body = await get(h, token)
            assert status == 200, body
            assert header_values(body, "X-Service-User") == ["svc"]
        assert upstream.client_subjects == ["gateway-client"] * 3
        assert len(upstream.connections) == 1


@SQLITE_ONLY
async def test_mutual_tls_without_client_certificate_is_502(
    make_harness: Callable[..., Awaitable[Harness]], tls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with tls_upstream(tls_dir, "server", require_client_cert=True) as upstream:
        h, token = await start(make_harness, f"https://localhost:{upstream.port}", {"ca_file": "tls/ca.pem"})
        status, body = await get(h, token)
        assert (status, body.get("error")) == (502, "upstream_unavailable"), body
        assert upstream.requests == 0
    assert_token_never_logged(caplog, token)


@SQLITE_ONLY
async def test_server_name_sets_sni_and_the_name_checked(
    make_harness: Callable[..., Awaitable[Harness]], tls_dir: Path
) -> None:
    async with tls_upstream(tls_dir, "named") as upstream:
        tls = {"ca_file": "tls/ca.pem", "server_name": "upstream.test"}
        h, token = await start(make_harness, f"https://127.0.0.1:{upstream.port}", tls)
        status, body = await get(h, token)
        assert status == 200, body
        assert header_values(body, "X-Service-User") == ["svc"]
        assert upstream.server_names == ["upstream.test"]


# --- refusals: 502 upstream_unavailable, and the log says why -----------------------------------

FAILURES = {
    # no tls block: the system's trust store, which does not know the test CA
    "unknown-ca": ("server", "localhost", None, ("certificate verify failed", "unable to get local issuer")),
    "ip-mismatch": (
        "named",
        "127.0.0.1",
        {"ca_file": "tls/ca.pem"},
        ("ip address mismatch", "hostname mismatch"),
    ),
    "hostname-mismatch": ("named", "localhost", {"ca_file": "tls/ca.pem"}, ("hostname mismatch",)),
    "expired": ("expired", "localhost", {"ca_file": "tls/ca.pem"}, ("certificate has expired",)),
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", list(FAILURES))
async def test_failed_handshake_is_502_and_logged_with_its_reason(
    make_harness: Callable[..., Awaitable[Harness]],
    tls_dir: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    cert, host, tls, reasons = FAILURES[case]
    caplog.set_level(logging.INFO)
    async with tls_upstream(tls_dir, cert) as upstream:
        h, token = await start(make_harness, f"https://{host}:{upstream.port}", tls)
        status, body = await get(h, token)
        assert (status, body.get("error")) == (502, "upstream_unavailable"), body
        assert upstream.requests == 0
    texts = [record_text(r).lower() for r in gateway_records(caplog)]
    assert any(reason in text for text in texts for reason in reasons), (
        f"no gateway.* log record names the reason ({' / '.join(reasons)}):\n" + "\n".join(texts)
    )
    assert_token_never_logged(caplog, token)


# --- verify: false ----------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("cert", "host", "ca_file"),
    [("expired", "localhost", None), ("server", "localhost", None), ("named", "127.0.0.1", "tls/ca.pem")],
    ids=["expired-unknown-ca", "unknown-ca", "name-mismatch"],
)
async def test_verify_false_connects_and_warns_at_every_start(
    make_harness: Callable[..., Awaitable[Harness]],
    tls_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cert: str,
    host: str,
    ca_file: str | None,
) -> None:
    caplog.set_level(logging.INFO)
    tls: dict[str, Any] = {"verify": False}
    if ca_file is not None:
        tls["ca_file"] = ca_file

    def warnings() -> list[logging.LogRecord]:
        return [
            r for r in gateway_records(caplog) if r.levelno == logging.WARNING and "secure" in record_text(r)
        ]

    async with tls_upstream(tls_dir, cert) as upstream:
        h, token = await start(make_harness, f"https://{host}:{upstream.port}", tls)
        assert len(warnings()) == 1, "one warning naming the route when the gateway opens"
        status, body = await get(h, token)
        assert status == 200, body
        assert header_values(body, "X-Service-User") == ["svc"]
        # Another start: warned again.
        again = await Gateway.open(load_config(tmp_path / "gateway.yaml", env={}))
        await again.close()
        assert len(warnings()) == 2
    assert_token_never_logged(caplog, token)


# --- config errors: file:line -----------------------------------------------------------------


def config_with(tmp_path: Path, upstream: str, tls: dict[str, Any] | None) -> Path:
    return write_config(
        tmp_path,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}",
        upstream_url="http://127.0.0.1:9",
        policies=POLICIES,
        extra_yaml=secure_route(upstream, tls),
    )


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first `needle` inside the secure route."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "name: secure" in line)
    return next(i + 1 for i, line in enumerate(lines) if i >= start and needle in line)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems, "a ConfigError lists its problems"
    return info.value.problems


def test_full_tls_block_loads(tmp_path: Path, tls_dir: Path) -> None:
    tls = {
        "ca_file": "tls/ca.pem",
        "cert_file": "tls/client.pem",
        "key_file": "tls/client.key",
        "server_name": "upstream.test",
        "verify": True,
    }
    config = load_config(config_with(tmp_path, "https://127.0.0.1:8443", tls), env={})
    (route,) = [r for r in config.routes if r.name == "secure"]
    assert route.tls is not None


CONFIG_ERRORS = {
    # case: (upstream, tls, needles whose lines may carry the problem, words the problem mentions)
    "missing-ca-file": (
        "https://127.0.0.1:8443",
        {"ca_file": "tls/missing.pem"},
        ("ca_file:",),
        ("missing.pem", "ca_file"),
    ),
    "key-does-not-match": (
        "https://127.0.0.1:8443",
        {"ca_file": "tls/ca.pem", "cert_file": "tls/client.pem", "key_file": "tls/stray.key"},
        ("cert_file:", "key_file:"),
        ("match",),
    ),
    "cert-without-key": (
        "https://127.0.0.1:8443",
        {"ca_file": "tls/ca.pem", "cert_file": "tls/client.pem"},
        ("tls:", "cert_file:"),
        ("key_file",),
    ),
    "tls-on-http": ("http://127.0.0.1:8080", {"ca_file": "tls/ca.pem"}, ("tls:", "upstream:"), ("https",)),
    "unknown-key": (
        "https://127.0.0.1:8443",
        {"ca_file": "tls/ca.pem", "ca_flie": "tls/ca.pem"},
        ("ca_flie:",),
        ("ca_flie",),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_file_and_line(tmp_path: Path, tls_dir: Path, case: str) -> None:
    upstream, tls, needles, words = CONFIG_ERRORS[case]
    path = config_with(tmp_path, upstream, tls)
    problems = problems_of(path)
    prefixes = tuple(f"{path}:{line_of(path, needle)}: " for needle in needles)
    matching = [p for p in problems if p.startswith(prefixes) and any(w in p for w in words)]
    assert matching, f"expected a problem at {' or '.join(prefixes)} mentioning {words}; got {problems}"
