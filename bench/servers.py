"""The servers a run measures or needs: nginx (upstream and plain proxy), the gateway, the bare proxy.

Each `start_*` function writes its own config into the run's work directory, starts the
process through `Processes` (pinned with taskset), waits until it answers, and returns it.
The edge scenario adds TLS (one self-signed pair for nginx and the gateway alike) and a
WebSocket echo upstream with a `websocket: true` route to it. The throughput scenario adds an
API key exchanged for a JWT access token, and a gateway whose bench route has `assertion: true`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.procs import LOOPBACK, Proc, Processes, free_port, wait_http_ok, wait_port

REPO = Path(__file__).resolve().parent.parent

# The upstream's fixed answer: 98 bytes of JSON.
UPSTREAM_BODY = (
    '{"ok":true,"service":"bench-upstream","items":[1,2,3],"note":"a fixed body for the gateway bench"}'
)
assert len(UPSTREAM_BODY.encode()) == 98, len(UPSTREAM_BODY.encode())

BENCH_PATH = "/bench/item"
# The upstream echoes the X-Service-User-Assertion it received only on this path (so the
# measured responses of BENCH_PATH stay the same 98 bytes plus headers through every server).
ASSERTION_PATH = "/bench/assertion"
WS_PATH = "/ws/echo"
ROLE = "bench-reader"


@dataclass
class Server:
    """A started server: its process and the base URL to send load to."""

    proc: Proc
    port: int
    label: str
    scheme: str = "http"  # https: the server terminates TLS; ws: a WebSocket upstream

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(frozen=True)
class TlsPair:
    """A PEM certificate and its private key, as files."""

    cert: Path
    key: Path


def write_self_signed_pair(directory: Path, days: int = 90) -> TlsPair:
    """A P-256 key and a self-signed certificate for 127.0.0.1 and localhost.

    P-256 (ECDSA) because it is what a TLS front usually serves today and signs a handshake
    far cheaper than RSA-2048; 90 days because the gateway warns about a pair that expires
    within 14. Both nginx and the gateway serve this same pair, so neither gets a cheaper key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway-bench")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pair = TlsPair(directory / "bench.crt", directory / "bench.key")
    pair.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair.key.chmod(0o600)
    return pair


def _nginx_conf(work: Path, name: str, http_body: str) -> Path:
    """An nginx config: one process (no master, no daemon), no access log, temp paths in `work`."""
    temp = work / f"nginx-{name}-temp"
    temp.mkdir(exist_ok=True)
    main = textwrap.dedent(
        f"""\
        daemon off;
        master_process off;
        worker_processes 1;
        pid {work}/nginx-{name}.pid;
        error_log {work}/nginx-{name}.error.log warn;
        events {{ worker_connections 4096; }}
        """
    )
    http_common = textwrap.dedent(
        f"""\
        access_log off;
        client_body_temp_path {temp}/body;
        proxy_temp_path {temp}/proxy;
        fastcgi_temp_path {temp}/fastcgi;
        uwsgi_temp_path {temp}/uwsgi;
        scgi_temp_path {temp}/scgi;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
        """
    )
    conf = work / f"nginx-{name}.conf"
    conf.write_text(
        main
        + "http {\n"
        + textwrap.indent(http_common, "    ")
        + textwrap.indent(textwrap.dedent(http_body), "    ")
        + "}\n"
    )
    return conf


def nginx_argv(work: Path, conf: Path) -> list[str]:
    return ["nginx", "-p", str(work), "-e", str(work / f"{conf.stem}.error.log"), "-c", str(conf)]


def start_nginx_upstream(procs: Processes, work: Path, cpus: str, port: int) -> Server:
    """nginx answering every request with the fixed 98-byte JSON body.

    It echoes the X-Service-User it received as X-Seen-User (absent when empty), so a
    sanity check can see that the proxies under test attached the identity; on
    ASSERTION_PATH it also echoes X-Service-User-Assertion as X-Seen-Assertion, so the
    sanity check of an `assertion: true` route can verify the JWT the upstream got.
    """
    body = UPSTREAM_BODY.replace("'", "\\'")
    conf = _nginx_conf(
        work,
        "upstream",
        f"""\
        server {{
            listen {LOOPBACK}:{port};
            location / {{
                default_type application/json;
                add_header X-Seen-User $http_x_service_user;
                return 200 '{body}';
            }}
            location = {ASSERTION_PATH} {{
                default_type application/json;
                add_header X-Seen-User $http_x_service_user;
                add_header X-Seen-Assertion $http_x_service_user_assertion;
                return 200 '{body}';
            }}
        }}
        """,
    )
    proc = procs.start("nginx-upstream", nginx_argv(work, conf), cpus=cpus)
    wait_port(port, proc)
    return Server(proc, port, "nginx upstream")


def start_nginx_proxy(
    procs: Processes, work: Path, cpus: str, upstream_port: int, tls: TlsPair | None = None
) -> Server:
    """nginx as a plain reverse proxy (keep-alive pool to the upstream), no auth.

    With `tls`, the same proxy terminating TLS with that pair (config `nginx-proxy-tls.conf`):
    TLS 1.2/1.3 and the gateway's own cipher list, so the two offer the same handshake.
    """
    port = free_port()
    name = "proxy" if tls is None else "proxy-tls"
    listen = [f"listen {LOOPBACK}:{port};"]
    if tls is not None:
        listen = [
            f"listen {LOOPBACK}:{port} ssl;",
            f"ssl_certificate {tls.cert};",
            f"ssl_certificate_key {tls.key};",
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;",
        ]
    server_lines = ("\n" + " " * 12).join(listen)  # inside `server {`, before dedent
    conf = _nginx_conf(
        work,
        name,
        f"""\
        upstream bench_upstream {{
            server {LOOPBACK}:{upstream_port};
            keepalive 64;
            keepalive_requests 1000000;
        }}
        server {{
            {server_lines}
            location / {{
                proxy_pass http://bench_upstream;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        """,
    )
    proc = procs.start(f"nginx-{name}", nginx_argv(work, conf), cpus=cpus)
    wait_port(port, proc)
    if tls is None:
        return Server(proc, port, "nginx proxy")
    return Server(proc, port, "nginx TLS proxy", scheme="https")


def start_bare_proxy(
    procs: Processes, cpus: str, upstream_url: str, token: str, user: str = "bench", client: str = "aiohttp"
) -> Server:
    """bench/bare_proxy.py: dict of tokens, no policy, no logging, streamed responses.

    `client="gateway"`: the same proxy on the gateway's upstream client (the bench's (e)).
    """
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.bare_proxy",
        "--listen",
        f"{LOOPBACK}:{port}",
        "--upstream",
        upstream_url,
        "--client",
        client,
    ]
    # The token is passed in the environment, not on the command line (visible in ps).
    procs.env["BENCH_BARE_TOKENS"] = f"{token}={user}"
    try:
        proc = procs.start(
            "bare-proxy" if client == "aiohttp" else "bare-proxy-lean", argv, cpus=cpus, cwd=REPO
        )
    finally:
        del procs.env["BENCH_BARE_TOKENS"]
    wait_port(port, proc)
    return Server(proc, port, "bare aiohttp proxy" if client == "aiohttp" else "bare proxy, gateway client")


def start_stream_upstream(procs: Processes, cpus: str, port: int) -> Server:
    """bench/stream_upstream.py: streams N bytes / consumes the request body."""
    argv = [sys.executable, "-m", "bench.stream_upstream", "--listen", f"{LOOPBACK}:{port}"]
    proc = procs.start("stream-upstream", argv, cpus=cpus, cwd=REPO)
    wait_port(port, proc)
    return Server(proc, port, "streaming upstream")


def start_ws_upstream(procs: Processes, cpus: str, port: int) -> Server:
    """bench/ws_upstream.py: a WebSocket echo server."""
    argv = [sys.executable, "-m", "bench.ws_upstream", "--listen", f"{LOOPBACK}:{port}"]
    proc = procs.start("ws-upstream", argv, cpus=cpus, cwd=REPO)
    wait_port(port, proc)
    return Server(proc, port, "WebSocket echo upstream", scheme="ws")


# -- the gateway ---------------------------------------------------------------------

POLICY = f"""\
roles:
  service-user-project-admin:
    description: Every permission
    permissions: ["*"]
  {ROLE}:
    description: What the bench's service user may do
    permissions: ["bench:read", "bench:write"]
routes:
  bench:
    rules:
      - methods: [GET, HEAD]
        paths: ["/bench/**"]
        require: "bench:read"
  stream:
    rules:
      - methods: [GET, HEAD]
        paths: ["/stream/**"]
        require: "bench:read"
      - methods: [POST, PUT]
        paths: ["/stream/**"]
        require: "bench:write"
"""


# The edge scenario's WebSocket route: a separate policy file, written only with that route
# (rules for a route the config does not define are an error).
WS_POLICY = """\
routes:
  ws:
    rules:
      - methods: [GET]
        paths: ["/ws/**"]
        require: "bench:read"
"""


@dataclass
class GatewaySetup:
    """A gateway config directory with its store prepared and a real token in it."""

    directory: Path
    config: Path
    store_url: str
    token: str
    proxy_port: int
    admin_port: int
    commands: list[str]
    tls: TlsPair | None = None  # the proxy listener serves HTTPS with this pair
    key_id: str = ""  # the bench user's API key (create_bench_key), its public id …
    key_secret: str = ""  # … and its secret (never written to RESULTS.md)

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"


def write_gateway_config(
    directory: Path,
    store_url: str,
    bench_upstream: str,
    stream_upstream: str,
    *,
    tls: TlsPair | None = None,
    ws_upstream: str | None = None,
    assertion: bool = False,
    secret_key_file: Path | None = None,
    rate_limit_store: str | None = None,
) -> GatewaySetup:
    """gateway.yaml (routes `bench` and `stream`, log_level info) and policies/bench.yaml.

    `tls`: the proxy listener in the object form with that pair (the admin listener stays
    plain HTTP, for the readiness poll). `ws_upstream`: one more route, `ws` (`/ws`,
    `websocket: true`), and policies/ws.yaml for it. `assertion`: the `bench` route signs
    an identity assertion (a JWT) for every forwarded request.

    `rate_limit_store`: a `rate_limits` block on that store (`memory` or a redis:// URL) with
    `per_user`, `auth_failures` and a `bench` route `rate_limit`, all far above any rate a
    run reaches, so every check runs and none refuses.

    `secret_key_file` (`signing.secret_key_file`): the sealing secret of the store's signing
    keys. The first `gateway serve` on a fresh store makes a key and writes gateway.secret
    beside its own gateway.yaml; a second config directory on the same store must point at
    that file, or its gateway refuses to start (it cannot open the key).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "bench.yaml").write_text(POLICY)
    proxy_port, admin_port = free_port(), free_port()
    if tls is None:
        proxy = f' "{LOOPBACK}:{proxy_port}"'
    else:
        proxy = (
            f'\n    listen: "{LOOPBACK}:{proxy_port}"'
            f'\n    tls:\n      cert_file: "{tls.cert}"\n      key_file: "{tls.key}"'
        )
    routes = f'- name: bench\n  prefix: /bench\n  upstream: "{bench_upstream}"\n'
    if assertion:
        routes += "  assertion: true\n"
    if rate_limit_store is not None:
        routes += "  rate_limit: {rate: 1000000, per: 1s}\n"
    routes += textwrap.dedent(
        f"""\
          - name: stream
            prefix: /stream
            upstream: "{stream_upstream}"
            timeout: 60
            max_body: 2147483648
        """
    )
    if ws_upstream is not None:
        (directory / "policies" / "ws.yaml").write_text(WS_POLICY)
        routes += textwrap.dedent(
            f"""\
              - name: ws
                prefix: /ws
                upstream: "{ws_upstream}"
                websocket: true
            """
        )
    signing = "" if secret_key_file is None else f'signing:\n  secret_key_file: "{secret_key_file}"\n'
    if rate_limit_store is not None:
        signing += (
            f'rate_limits:\n  store: "{rate_limit_store}"\n'
            "  per_user: {rate: 1000000, per: 1s}\n  auth_failures: {rate: 1000000, per: 1s}\n"
        )
    config = directory / "gateway.yaml"
    config.write_text(
        f'listeners:\n  proxy:{proxy}\n  admin: "{LOOPBACK}:{admin_port}"\n'
        + textwrap.dedent(
            f"""\
            store:
              url: "{store_url}"
            policies: policies/
            log_level: info
            """
        )
        + signing
        + "routes:\n"
        + textwrap.indent(routes, "  ")
    )
    return GatewaySetup(directory, config, store_url, "", proxy_port, admin_port, [], tls)


def gateway_cli(setup: GatewaySetup, env: dict[str, str], *args: str) -> str:
    """Run `python -m gateway --config CONFIG ARGS…` to completion; return its stdout."""
    argv = [sys.executable, "-m", "gateway", "--config", str(setup.config), *args]
    setup.commands.append(" ".join(["python -m gateway --config", str(setup.config), *args]))
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def create_bench_token(setup: GatewaySetup, env: dict[str, str]) -> str:
    """Create service user `bench` (role bench-reader) and its token `t`; return the secret."""
    gateway_cli(setup, env, "user", "create", "bench", "--roles", ROLE, "--description", "benchmark")
    out = gateway_cli(setup, env, "token", "set", "t", "--user", "bench")
    found = re.search(r"^Access token: (gw_\S+)$", out, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no 'Access token:' line in the output of token set:\n{out}")
    setup.token = found.group(1)
    return setup.token


def create_bench_key(setup: GatewaySetup, env: dict[str, str]) -> tuple[str, str]:
    """Create an API key of user `bench` (made by create_bench_token); return (key id, secret)."""
    out = gateway_cli(setup, env, "key", "create", "--user", "bench", "--description", "benchmark")
    key_id = re.search(r"^Key ID: (key_\S+)$", out, re.MULTILINE)
    secret = re.search(r"^Key secret: (gwk_\S+)$", out, re.MULTILINE)
    if key_id is None or secret is None:
        raise RuntimeError("no 'Key ID:' / 'Key secret:' line in the output of key create")
    setup.key_id, setup.key_secret = key_id.group(1), secret.group(1)
    return setup.key_id, setup.key_secret


@dataclass(frozen=True)
class AccessToken:
    """The answer of POST /.gateway/token: a JWT and how long it lives."""

    token: str
    expires_in: float
    scope: str


def token_endpoint_url(setup: GatewaySetup) -> str:
    return f"http://{LOOPBACK}:{setup.proxy_port}/.gateway/token"


def exchange_api_key(setup: GatewaySetup, timeout: float = 10.0) -> AccessToken:
    """Exchange the setup's API key for an access token at the running gateway's token endpoint.

    OAuth 2.0 client credentials with `client_id`/`client_secret` form fields, as a client
    of the gateway would send them (over HTTP, so the exchange is the real one, not a JWT
    the bench made itself). The secret and the token are never part of an error message.
    """
    body = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": setup.key_id, "client_secret": setup.key_secret}
    ).encode()
    request = urllib.request.Request(  # noqa: S310 (a loopback URL we built)
        token_endpoint_url(setup),
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode(errors="replace")
        raise RuntimeError(f"POST /.gateway/token: HTTP {error.code}: {detail}") from None
    token = answer.get("access_token")
    if not isinstance(token, str) or token.count(".") != 2 or answer.get("token_type") != "Bearer":
        raise RuntimeError(f"POST /.gateway/token: no Bearer JWT in the answer (keys {sorted(answer)})")
    return AccessToken(token, float(answer.get("expires_in", 0)), str(answer.get("scope", "")))


def gateway_serve_argv(setup: GatewaySetup, workers: int | str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "gateway", "--config", str(setup.config), "serve"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv


def start_gateway(
    procs: Processes, setup: GatewaySetup, cpus: str, name: str, workers: int | str | None = None
) -> Server:
    """`python -m gateway --config CONFIG serve` pinned to `cpus`; stderr (the JSON log) to a file."""
    proc = procs.start(name, gateway_serve_argv(setup, workers), cpus=cpus, cwd=REPO)
    wait_http_ok(f"http://{LOOPBACK}:{setup.admin_port}/readyz", proc, timeout=60)
    return Server(proc, setup.proxy_port, name, scheme=setup.scheme)
