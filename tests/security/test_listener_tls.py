"""Listener TLS on a real `gateway serve` process (CONTRACT/README "TLS on the listeners").

Every certificate is made here with `cryptography` (one CA, then server certificates for
`localhost` and 127.0.0.1 with fresh serial numbers, EC P-256 unless said), written as PEM
into `tmp_path/tls/` next to gateway.yaml, which names them by relative paths. The gateway
runs as a subprocess (`tests.process.GatewayProcess`: uvloop, the production wiring) in
front of the real echo upstream, on a SQLite store in `tmp_path`.

Checked: HTTPS answers and `X-Forwarded-Proto: https` upstream, plain HTTP refused; the
protocol profile as `openssl s_client` sees it (TLS 1.2 floor, ECDHE + AES-GCM/ChaCha20 only,
ALPN `http/1.1` only, `min_version: "1.3"`), an RSA key behind `key_password_file`;
`gateway check` (and `serve`) refusing a missing file, a mismatched key, an expired
certificate, and warning on one about to expire; SIGHUP giving new connections a new pair
while kept-alive ones carry on, a bad pair refused and logged with the last good one kept;
a reload under load failing no request; two workers; TLS on the admin listener.

An encrypted key_file without key_password_file must be a clear error, never an OpenSSL
pass-phrase prompt on the controlling terminal (which blocked `gateway check` and froze a
serving process on SIGHUP before it was fixed).

The protocol probes need the `openssl` command: skipped without it, but a failure under CI
(`CI=true`), where it is part of the image. Each refusal probe is first shown to succeed
against a permissive stdlib server, so a refusal is the gateway's and not the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import functools
import ipaddress
import json
import os
import pty
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import IN_CI, write_config
from tests.process import REPO, GatewayProcess, free_port, serving, writer_token

# --- certificates -----------------------------------------------------------------------------

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Pair:
    cert: bytes  # PEM
    key: bytes  # PEM (PKCS#8; encrypted when issued with a password)
    serial: int


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@functools.cache
def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Listener TLS Test CA"))
        .issuer_name(_name("Listener TLS Test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def ca_pem() -> bytes:
    return _ca()[0].public_bytes(serialization.Encoding.PEM)


def issue(
    *,
    starts: dt.timedelta = dt.timedelta(days=-1),
    ends: dt.timedelta = dt.timedelta(days=30),
    rsa_key: bool = False,
    password: bytes | None = None,
) -> Pair:
    """A server certificate for localhost and 127.0.0.1, valid from now+`starts` to now+`ends`."""
    ca, ca_key = _ca()
    now = dt.datetime.now(dt.UTC)
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + starts)
        .not_valid_after(now + ends)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    return Pair(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert.serial_number)


def install(directory: Path, pair: Pair) -> None:
    """Write `pair` as tls/gateway.crt and tls/gateway.key (each replaced in one rename)."""
    tls = directory / "tls"
    tls.mkdir(exist_ok=True)
    (tls / "ca.pem").write_bytes(ca_pem())
    for name, data in (("gateway.crt", pair.cert), ("gateway.key", pair.key)):
        fresh = tls / f"{name}.new"
        fresh.write_bytes(data)
        os.replace(fresh, tls / name)


@functools.cache
def client_context() -> ssl.SSLContext:
    """What a client trusting only the test CA uses (host name checked: 127.0.0.1 is in the SAN).

    One object for the run: aiohttp pools connections per SSL context, so a context made per
    request would never reuse a kept-alive connection.
    """
    return ssl.create_default_context(cadata=ca_pem().decode())


def serial_of(der: bytes | None) -> int:
    assert der, "no peer certificate"
    return x509.load_der_x509_certificate(der).serial_number


# --- configuration ----------------------------------------------------------------------------


def tls_block(
    *,
    cert: str = "tls/gateway.crt",
    key: str = "tls/gateway.key",
    password_file: str | None = None,
    min_version: str | None = None,
) -> str:
    """The object form of a listener (the address is overridden by GatewayProcess's environment)."""
    lines = ['    listen: "127.0.0.1:0"', "    tls:", f"      cert_file: {cert}", f"      key_file: {key}"]
    if password_file is not None:
        lines.append(f"      key_password_file: {password_file}")
    if min_version is not None:
        lines.append(f'      min_version: "{min_version}"')
    return "\n".join(lines) + "\n"


def gateway_config(
    directory: Path,
    upstream: TestServer | None,
    *,
    proxy: str | None = None,
    admin: str | None = None,
) -> Path:
    """gateway.yaml (SQLite store next to it) with these listener blocks instead of the strings."""
    upstream_url = str(upstream.make_url("")).rstrip("/") if upstream else "http://127.0.0.1:9"
    path = write_config(directory, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=upstream_url)
    text = path.read_text()
    for name, block in (("proxy", proxy), ("admin", admin)):
        if block is not None:
            plain = f'  {name}: "127.0.0.1:0"\n'
            assert plain in text, text
            text = text.replace(plain, f"  {name}:\n{block}")
    path.write_text(text)
    return path


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of gateway.yaml where `needle` first appears."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


# --- helpers ----------------------------------------------------------------------------------


def https(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


TIMEOUT = aiohttp.ClientTimeout(total=10)


async def until(
    check: Callable[[], Awaitable[bool]], what: str, process: GatewayProcess, within: float = 10.0
) -> None:
    """Poll `check` until it holds; fail naming `what` (with the log's tail) after `within` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within:g}s\n{process.logs()[-3000:]}")
        await asyncio.sleep(0.05)


async def peer_serial(port: int) -> int:
    """The serial number of the certificate a NEW connection to `port` is served."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client_context()), timeout=5
    )
    try:
        return serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)


@dataclass
class Answer:
    status: int
    body: bytes
    transport: Any  # the connection that carried it
    serial: int  # of the certificate that connection was served


_carried: contextvars.ContextVar[list[tuple[Any, int]]] = contextvars.ContextVar("carried")


class RecordingConnector(aiohttp.TCPConnector):
    """A connector that tells `get` which connection (transport) carried its request.

    (aiohttp hands a connection back to its pool as soon as a short answer is in, so
    `response.connection` is already None when the caller first sees the response.)
    """

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:
        connection = await super().connect(req, traces, timeout)
        with contextlib.suppress(LookupError):
            transport = connection.transport
            assert transport is not None
            der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            _carried.get().append((transport, serial_of(der)))
        return connection


def client_session(*, fresh: bool = False, **options: Any) -> aiohttp.ClientSession:
    """A session that keeps connections alive, or (`fresh`) makes a new connection per request."""
    return aiohttp.ClientSession(connector=RecordingConnector(force_close=fresh), **options)


async def get(session: aiohttp.ClientSession, port: int, token: str, path: str = "/echo/tls") -> Answer:
    """GET `path` on the proxy over HTTPS with the token; which connection and certificate carried it."""
    carried: list[tuple[Any, int]] = []
    reset = _carried.set(carried)
    try:
        async with session.get(
            https(port, path),
            headers={"Authorization": f"Bearer {token}"},
            ssl=client_context(),
            timeout=TIMEOUT,
        ) as response:
            body = await response.read()
    finally:
        _carried.reset(reset)
    assert len(carried) == 1, carried
    transport, serial = carried[0]
    return Answer(response.status, body, transport, serial)


async def plain_http_answer(port: int) -> bytes:
    """What a plain HTTP/1.1 request to `port` gets back before the connection ends."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=5)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout=5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def logged(process: GatewayProcess, text: str) -> Callable[[], Awaitable[bool]]:
    """A check for `until`: `text` is in the process log."""

    async def check() -> bool:
        return text in process.logs()

    return check


def log_records(process: GatewayProcess) -> list[dict[str, Any]]:
    records = []
    for line in process.logs().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def serving_lines(process: GatewayProcess) -> list[dict[str, Any]]:
    return [r for r in log_records(process) if r.get("message") == "gateway serving"]


async def wait_ready_https(process: GatewayProcess, within: float = 20.0) -> None:
    """GatewayProcess.wait_ready, for an admin listener that speaks TLS."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{process.logs()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(
                    https(process.admin_port, "/readyz"), ssl=client_context()
                ) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway not ready in {within}s:\n{process.logs()}")


# --- openssl s_client -------------------------------------------------------------------------


def openssl() -> str:
    """The `openssl` command: a failure under CI (it is part of the image there), a skip elsewhere."""
    found = shutil.which("openssl")
    if found is None:
        message = "the `openssl` command (Debian package openssl) is needed for the protocol probes"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


@dataclass
class Probe:
    args: tuple[str, ...]
    returncode: int
    output: str

    def _field(self, pattern: str) -> str | None:
        found = re.search(pattern, self.output, re.MULTILINE)
        return found.group(1) if found else None

    @property
    def protocol(self) -> str | None:
        # "Protocol  :" is in the SSL-Session block, printed for TLS 1.3 only once a ticket
        # came; the "New, …" line names the cipher's own version, which for 1.3 suites is 1.3.
        return self._field(r"^\s*Protocol\s*:\s*(\S+)") or self._field(r"^New, (TLSv1\.3), Cipher is ")

    @property
    def cipher(self) -> str | None:
        cipher = self._field(r"^New, \S+, Cipher is (\S+)")
        return None if cipher in (None, "(NONE)") else cipher

    @property
    def alpn(self) -> str | None:
        return self._field(r"^ALPN protocol: (\S+)")

    @property
    def connected(self) -> bool:
        return self.returncode == 0 and self.cipher is not None

    def __repr__(self) -> str:
        return f"openssl s_client {' '.join(self.args)} -> rc {self.returncode}\n{self.output[-1500:]}"


async def s_client(port: int, ca_file: Path, *args: str) -> Probe:
    """One handshake with `openssl s_client` (stdin closed: it hangs up right after)."""
    command = [
        openssl(),
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(ca_file),
        "-verify_return_error",
        *args,
    ]
    done = await asyncio.to_thread(
        subprocess.run, command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10
    )
    return Probe(args, done.returncode, done.stdout + done.stderr)


@contextlib.asynccontextmanager
async def permissive_server(directory: Path, password: bytes | None = None) -> AsyncIterator[int]:
    """A stdlib TLS server on the same pair that accepts TLS 1.0 up and every cipher: the probes' control."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(directory / "tls" / "gateway.crt", directory / "tls" / "gateway.key", password)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


async def refused_by_gateway(gateway_port: int, control_port: int, ca_file: Path, *args: str) -> Probe:
    """The probe `args` against the gateway, after checking the same probe connects to the control."""
    control = await s_client(control_port, ca_file, *args)
    assert control.connected, f"the probe itself cannot connect (client side?):\n{control}"
    return await s_client(gateway_port, ca_file, *args)


# --- 1. HTTPS on the proxy listener -----------------------------------------------------------


async def test_https_proxy_forwards_with_forwarded_proto_https_and_refuses_plain_http(
    tmp_path: Path, upstream: TestServer
) -> None:
    install(tmp_path, issue())
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        # A client claiming the request was plain HTTP is not believed (it is no trusted proxy).
        async with session.get(
            https(process.proxy_port, "/echo/over-tls"),
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "http"},
            ssl=client_context(),
            timeout=TIMEOUT,
        ) as response:
            assert response.status == 200, await response.text()
            echoed = await response.json()
        assert echoed["raw_path"] == "/echo/over-tls"
        proto = [value for name, value in echoed["headers"] if name.lower() == "x-forwarded-proto"]
        assert proto == ["https"]
        assert [value for name, value in echoed["headers"] if name.lower() == "x-service-user"] == ["svc"]

        answer = await plain_http_answer(process.proxy_port)
        assert not answer.startswith(b"HTTP/"), answer[:200]
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                f"http://127.0.0.1:{process.proxy_port}/echo/plain",
                headers={"Authorization": f"Bearer {token}"},
                timeout=TIMEOUT,
            ) as response:
                await response.read()
        assert [line.get("tls") for line in serving_lines(process)] == [["proxy"]]


# --- 2. The protocol profile, as openssl sees it ----------------------------------------------

ACCEPTED_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
)
REFUSED_TLS12 = (  # CBC (SHA-1 and SHA-2 MACs) and CCM: not in Mozilla "intermediate"
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-ECDSA-AES128-CCM",
)


async def test_protocol_profile_tls12_floor_aead_only_alpn_http11(
    tmp_path: Path, upstream: TestServer
) -> None:
    openssl()
    install(tmp_path, issue())
    ca_file = tmp_path / "tls" / "ca.pem"
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    async with serving(config) as (process, _), permissive_server(tmp_path) as control:
        port = process.proxy_port

        default = await s_client(port, ca_file)
        assert default.connected and default.protocol == "TLSv1.3", default

        modern = await s_client(port, ca_file, "-tls1_2")
        assert modern.connected and modern.protocol == "TLSv1.2", modern
        assert re.fullmatch(
            r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", modern.cipher or ""
        )
        for cipher in ACCEPTED_TLS12:
            probe = await s_client(port, ca_file, "-tls1_2", "-cipher", cipher)
            assert probe.connected and (probe.protocol, probe.cipher) == ("TLSv1.2", cipher), probe

        # The client is told to allow TLS 1.0/1.1 (Debian's openssl.cnf sets a 1.2 floor otherwise).
        for version in ("-tls1", "-tls1_1"):
            old = await refused_by_gateway(port, control, ca_file, version, "-cipher", "DEFAULT@SECLEVEL=0")
            assert not old.connected, old
        for cipher in REFUSED_TLS12:
            probe = await refused_by_gateway(port, control, ca_file, "-tls1_2", "-cipher", cipher)
            assert not probe.connected, probe

        both = await s_client(port, ca_file, "-alpn", "h2,http/1.1")
        assert both.connected and both.alpn == "http/1.1", both
        h2 = await s_client(port, ca_file, "-alpn", "h2")
        assert h2.connected and h2.alpn is None and "No ALPN negotiated" in h2.output, h2
        assert process.process.poll() is None


async def test_min_version_13_refuses_a_tls12_client(tmp_path: Path, upstream: TestServer) -> None:
    openssl()
    install(tmp_path, issue())
    ca_file = tmp_path / "tls" / "ca.pem"
    config = gateway_config(tmp_path, upstream, proxy=tls_block(min_version="1.3"))
    async with serving(config) as (process, token), permissive_server(tmp_path) as control:
        port = process.proxy_port
        refused = await refused_by_gateway(port, control, ca_file, "-tls1_2")
        assert not refused.connected, refused
        accepted = await s_client(port, ca_file, "-tls1_3")
        assert accepted.connected and accepted.protocol == "TLSv1.3", accepted
        async with client_session() as session:
            assert (await get(session, port, token)).status == 200


async def test_rsa_key_behind_key_password_file(tmp_path: Path, upstream: TestServer) -> None:
    openssl()
    pair = issue(rsa_key=True, password=b"correct horse")
    install(tmp_path, pair)
    assert b"ENCRYPTED PRIVATE KEY" in pair.key
    (tmp_path / "tls" / "key.pass").write_text("correct horse\n")  # as an editor saves it
    ca_file = tmp_path / "tls" / "ca.pem"
    config = gateway_config(tmp_path, upstream, proxy=tls_block(password_file="tls/key.pass"))
    async with serving(config) as (process, token), permissive_server(tmp_path, b"correct horse") as control:
        port = process.proxy_port
        async with client_session() as session:
            answer = await get(session, port, token)
        assert (answer.status, answer.serial) == (200, pair.serial), answer.body[:300]
        rsa12 = await s_client(port, ca_file, "-tls1_2")
        assert rsa12.connected and re.fullmatch(
            r"ECDHE-RSA-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)", rsa12.cipher or ""
        ), rsa12
        cbc = await refused_by_gateway(port, control, ca_file, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA")
        assert not cbc.connected, cbc
        plain_rsa = await refused_by_gateway(
            port, control, ca_file, "-tls1_2", "-cipher", "AES128-GCM-SHA256"
        )
        assert not plain_rsa.connected, plain_rsa  # RSA key exchange: no forward secrecy


# --- 3. `gateway check` and `gateway serve` on a bad pair -------------------------------------


def gateway_env(**extra: str) -> dict[str, str]:
    """The environment of a `gateway` child: this checkout's code first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_gateway(
    config: Path, *args: str, timeout: float = 20, python: tuple[str, ...] = (sys.executable,)
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway --config CONFIG ARGS` to its end (bounded), output captured."""
    env = gateway_env()
    return subprocess.run(
        [*python, "-m", "gateway", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=env,
        start_new_session=True,  # no controlling terminal unless `python` acquires one
    )


LOADS_NOT = r"listeners\.proxy\.tls: the certificate and key do not load together \(.+\)"
DATE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _missing_cert(d: Path) -> tuple[str, str, str]:
    install(d, issue())
    return (
        tls_block(cert="tls/missing.crt"),
        "cert_file:",
        r"listeners\.proxy\.tls\.cert_file: cannot read 'tls/missing\.crt'",
    )


def _other_key(d: Path) -> tuple[str, str, str]:
    install(d, issue())
    (d / "tls" / "other.key").write_bytes(issue().key)
    return tls_block(key="tls/other.key"), "tls:", LOADS_NOT


def _expired(d: Path) -> tuple[str, str, str]:
    install(d, issue(starts=dt.timedelta(days=-30), ends=dt.timedelta(days=-1)))
    return tls_block(), "tls:", rf"listeners\.proxy\.tls: the certificate expired on {DATE}"


def _not_yet_valid(d: Path) -> tuple[str, str, str]:
    install(d, issue(starts=dt.timedelta(days=2), ends=dt.timedelta(days=30)))
    return tls_block(), "tls:", rf"listeners\.proxy\.tls: the certificate is not valid before {DATE}"


def _wrong_password(d: Path) -> tuple[str, str, str]:
    install(d, issue(password=b"secret"))
    (d / "tls" / "key.pass").write_text("not the secret\n")
    return tls_block(password_file="tls/key.pass"), "tls:", LOADS_NOT


# name -> writes the files; returns (proxy listener block, needle of the line named, message)
CHECK_REFUSALS: dict[str, Callable[[Path], tuple[str, str, str]]] = {
    "missing cert_file": _missing_cert,
    "key of another certificate": _other_key,
    "expired certificate": _expired,
    "certificate not yet valid": _not_yet_valid,
    "wrong key password": _wrong_password,
}


@pytest.mark.parametrize("case", sorted(CHECK_REFUSALS))
def test_check_refuses_an_unusable_pair_with_file_and_line(tmp_path: Path, case: str) -> None:
    block, needle, message = CHECK_REFUSALS[case](tmp_path)
    config = gateway_config(tmp_path, None, proxy=block)
    done = run_gateway(config, "check")
    assert done.returncode == 1, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    expected = rf"error: (.*/)?gateway\.yaml:{line_of(config, needle)}: {message}"
    assert len(errors) == 1 and re.fullmatch(expected, errors[0]), (expected, done.stderr)


def test_check_warns_about_a_certificate_expiring_within_14_days(tmp_path: Path) -> None:
    pair = issue(ends=dt.timedelta(days=5))
    install(tmp_path, pair)
    expires = x509.load_pem_x509_certificate(pair.cert).not_valid_after_utc
    config = gateway_config(tmp_path, None, proxy=tls_block())
    done = run_gateway(config, "check")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.startswith("ok: "), done.stdout
    expected = (
        rf"warning: (.*/)?gateway\.yaml:{line_of(config, 'tls:')}: listeners\.proxy\.tls: "
        rf"the certificate expires on {expires:%Y-%m-%dT%H:%M:%SZ} \(within 14 days\)"
    )
    assert any(re.fullmatch(expected, line) for line in done.stderr.splitlines()), (expected, done.stderr)


def test_serve_refuses_to_start_on_an_expired_certificate(tmp_path: Path) -> None:
    install(tmp_path, issue(starts=dt.timedelta(days=-30), ends=dt.timedelta(days=-1)))
    config = gateway_config(tmp_path, None, proxy=tls_block())
    done = run_gateway(config, "serve")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert re.search(r"gateway\.yaml:\d+: listeners\.proxy\.tls: the certificate expired on ", done.stderr), (
        done.stderr
    )


# An encrypted key and no key_password_file: without a password argument OpenSSL's own pass
# phrase prompt would take over and read the controlling terminal (an operator's shell,
# `docker run -it`, tmux), so `gateway check`, `serve` and a SIGHUP reload would wait for
# someone to type. These tests run the gateway on a terminal and expect a clear error.

# Run by the child python: become the session's controlling terminal (and stdin), then exec.
_ON_TERMINAL = (
    "import os, sys; os.dup2(os.open(sys.argv[1], os.O_RDWR), 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


@contextlib.contextmanager
def terminal() -> Iterator[tuple[tuple[str, ...], Callable[[], str]]]:
    """A pseudo-terminal: the `python` prefix running a child on it, and what was written to it."""
    master, follower = pty.openpty()
    name = os.ttyname(follower)
    os.close(follower)
    seen = bytearray()

    def written() -> str:
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: no process has the terminal open any more
                break
            if not chunk:
                break
            seen.extend(chunk)
        return seen.decode(errors="replace")

    try:
        yield (sys.executable, "-c", _ON_TERMINAL, name), written
    finally:
        os.close(master)


def _encrypted_key_without_password_file(directory: Path, upstream: TestServer | None) -> Path:
    install(directory, issue(password=b"secret"))
    return gateway_config(directory, upstream, proxy=tls_block())


@pytest.mark.parametrize("on_terminal", [False, True], ids=["no terminal", "on a terminal"])
def test_check_refuses_an_encrypted_key_without_password_file_and_never_prompts(
    tmp_path: Path, on_terminal: bool
) -> None:
    config = _encrypted_key_without_password_file(tmp_path, None)
    with terminal() as (python, written):
        try:
            done = run_gateway(
                config, "check", timeout=8, python=python if on_terminal else (sys.executable,)
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`gateway check` still running after 8 s; its terminal shows: {written()!r}")
        shown = done.stderr + written()
    assert done.returncode == 1, (done.stdout, shown)
    assert "pass phrase" not in shown.lower(), shown
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    expected = r"error: (.*/)?gateway\.yaml:\d+: listeners\.proxy\.tls(\.key_file|\.key_password_file)?: .+"
    assert len(errors) == 1 and re.fullmatch(expected, errors[0]), done.stderr
    assert "Invalid argument" not in errors[0], errors  # the file reads fine: it is encrypted


async def test_sighup_to_an_encrypted_key_without_password_file_keeps_serving_on_a_terminal(
    tmp_path: Path, upstream: TestServer
) -> None:
    first = issue()
    install(tmp_path, first)
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    proxy_port, admin_port = free_port(), free_port()
    env = gateway_env(
        GATEWAY_PROXY_LISTEN=f"127.0.0.1:{proxy_port}", GATEWAY_ADMIN_LISTEN=f"127.0.0.1:{admin_port}"
    )
    log_path = tmp_path / "serve-on-terminal.log"
    with terminal() as (python, written), log_path.open("wb") as log:
        child = subprocess.Popen(
            [*python, "-m", "gateway", "--config", str(config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

                async def admin_answers() -> bool:
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                            return response.status == 200
                    assert child.poll() is None, log_path.read_text()
                    return False

                deadline = time.monotonic() + 20
                while not await admin_answers():
                    assert time.monotonic() < deadline, log_path.read_text()
                    await asyncio.sleep(0.1)
                install(tmp_path, issue(password=b"secret"))
                child.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 5
                while "reload refused" not in log_path.read_text() and "pass phrase" not in written().lower():
                    assert time.monotonic() < deadline, log_path.read_text()
                    await asyncio.sleep(0.05)
                assert await admin_answers(), f"no answer after SIGHUP; the terminal shows {written()!r}"
            assert await peer_serial(proxy_port) == first.serial
            assert "pass phrase" not in written().lower(), written()
        finally:
            child.kill()  # SIGTERM does not reach a loop blocked in the prompt
            child.wait(10)


# --- 4. SIGHUP: a new pair for new connections, open ones kept --------------------------------


async def test_sighup_gives_new_connections_the_new_pair_and_keeps_open_ones(
    tmp_path: Path, upstream: TestServer
) -> None:
    first, second, third = issue(), issue(), issue()
    install(tmp_path, first)
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    opened: list[object] = []

    async def connection_opened(*_: object) -> None:
        opened.append(object())

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(connection_opened)
    async with serving(config) as (process, token), client_session(trace_configs=[trace]) as kept:
        port = process.proxy_port
        before = await get(kept, port, token)
        assert (before.status, before.serial, len(opened)) == (200, first.serial, 1)

        install(tmp_path, second)
        process.signal(signal.SIGHUP)

        async def second_served() -> bool:
            return await peer_serial(port) == second.serial

        await until(second_served, "a new connection gets the new certificate", process)
        await until(logged(process, "TLS certificate reloaded"), "reload logged", process)
        after = await get(kept, port, token)
        # The same kept-alive connection, still on the certificate it was opened with.
        assert after.status == 200 and after.transport is before.transport, after.body[:300]
        assert (after.serial, len(opened)) == (first.serial, 1)

        # A pair that does not load: refused, logged, the last good one stays.
        install(
            tmp_path, Pair(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n", third.key, 0)
        )
        process.signal(signal.SIGHUP)
        await until(
            logged(process, "TLS certificate reload refused"),
            "refused reload logged",
            process,
        )
        refused = [
            r
            for r in log_records(process)
            if r.get("message", "").startswith("TLS certificate reload refused")
        ]
        assert refused and refused[0].get("listener") == "listeners.proxy", refused
        assert refused[0].get("problem"), refused
        assert await peer_serial(port) == second.serial
        fresh = await get(kept, port, token)
        assert (fresh.status, fresh.transport, len(opened)) == (200, before.transport, 1)
        async with client_session() as other:
            newcomer = await get(other, port, token)
        assert (newcomer.status, newcomer.serial) == (200, second.serial)

        # A good pair after the refused one is taken again.
        install(tmp_path, third)
        process.signal(signal.SIGHUP)

        async def third_served() -> bool:
            return await peer_serial(port) == third.serial

        await until(third_served, "a good pair after a refused one is loaded", process)
        assert process.process.poll() is None


# --- 5. A reload under load fails no request --------------------------------------------------


async def test_reload_under_load_fails_no_request(tmp_path: Path, upstream: TestServer) -> None:
    first, second = issue(), issue()
    install(tmp_path, first)
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    wanted, reload_after, deadline = 200, 50, time.monotonic() + 20
    outcomes: list[int | str] = []
    fresh_serials: list[int] = []
    reloaded = asyncio.Event()

    async with serving(config) as (process, token):
        port = process.proxy_port

        async def client(session: aiohttp.ClientSession, fresh: bool) -> None:
            # Until `wanted` answers are in and a fresh connection saw the new certificate.
            while len(outcomes) < wanted or second.serial not in fresh_serials:
                if time.monotonic() > deadline:
                    return
                try:
                    answer = await get(session, port, token)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                else:
                    outcomes.append(answer.status)
                    if fresh:
                        fresh_serials.append(answer.serial)
                if len(outcomes) >= reload_after and not reloaded.is_set():
                    reloaded.set()
                    install(tmp_path, second)
                    process.signal(signal.SIGHUP)

        async with client_session(fresh=True) as fresh, client_session() as kept:
            await asyncio.wait_for(
                asyncio.gather(*(client(fresh if i % 2 else kept, fresh=bool(i % 2)) for i in range(10))), 25
            )
        assert reloaded.is_set()
        failed = [outcome for outcome in outcomes if outcome != 200]
        assert not failed and len(outcomes) >= wanted, (len(outcomes), failed[:10])
        # The reload happened while requests ran: fresh connections saw both certificates.
        assert first.serial in fresh_serials and second.serial in fresh_serials, process.logs()[-2000:]
        assert "TLS certificate reloaded" in process.logs()


# --- 6. Two workers ---------------------------------------------------------------------------


async def test_two_workers_serve_and_reload_tls(tmp_path: Path, upstream: TestServer) -> None:
    first, second = issue(), issue()
    install(tmp_path, first)
    config = gateway_config(tmp_path, upstream, proxy=tls_block())
    async with serving(config, workers=2) as (process, token):
        port = process.proxy_port

        async def both_serving() -> bool:
            return len(serving_lines(process)) == 2

        await until(
            both_serving,
            "both workers serving",
            process,
            within=20,
        )
        assert sorted(int(line["worker"]) for line in serving_lines(process)) == [0, 1]
        assert all(line.get("tls") == ["proxy"] for line in serving_lines(process))

        async def fresh_request() -> Answer:
            async with client_session(fresh=True) as session:
                return await get(session, port, token)

        answers = await asyncio.gather(*(fresh_request() for _ in range(20)))
        assert [(a.status, a.serial) for a in answers] == [(200, first.serial)] * 20

        # SIGHUP reaches both workers (20 connections land on both, SO_REUSEPORT spreads them).
        install(tmp_path, second)
        process.signal(signal.SIGHUP)

        async def all_second() -> bool:
            serials = await asyncio.gather(*(peer_serial(port) for _ in range(20)))
            return set(serials) == {second.serial}

        await until(all_second, "every worker serves the new certificate", process)

        # A bad pair: the supervisor refuses the reload, the workers keep the last good pair.
        install(tmp_path, Pair(b"not a certificate\n", first.key, 0))
        process.signal(signal.SIGHUP)
        await until(logged(process, "reload refused"), "refused reload logged", process)
        refused = [r for r in log_records(process) if "reload refused" in r.get("message", "")]
        assert "listeners.proxy.tls" in json.dumps(refused), refused
        serials = await asyncio.gather(*(peer_serial(port) for _ in range(20)))
        assert set(serials) == {second.serial}
        assert process.process.poll() is None


# --- 7. TLS on the admin listener -------------------------------------------------------------


async def test_admin_listener_over_tls(tmp_path: Path, upstream: TestServer) -> None:
    first, second = issue(), issue()
    install(tmp_path, first)
    config = gateway_config(tmp_path, upstream, proxy=tls_block(), admin=tls_block())
    token = await writer_token(config)
    process = GatewayProcess(config)
    try:
        await wait_ready_https(process)
        async with client_session() as session:
            async with session.get(
                https(process.admin_port, "/healthz"), ssl=client_context(), timeout=TIMEOUT
            ) as response:
                assert response.status == 200, await response.text()
            assert (await get(session, process.proxy_port, token)).status == 200
        answer = await plain_http_answer(process.admin_port)
        assert not answer.startswith(b"HTTP/"), answer[:200]
        assert [line.get("tls") for line in serving_lines(process)] == [["admin", "proxy"]]
        assert await peer_serial(process.admin_port) == first.serial

        install(tmp_path, second)
        process.signal(signal.SIGHUP)

        async def admin_reloaded() -> bool:
            return await peer_serial(process.admin_port) == second.serial

        await until(admin_reloaded, "the admin listener serves the new certificate", process)
        assert await peer_serial(process.proxy_port) == second.serial
    finally:
        process.stop()
