"""gateway.yaml → frozen dataclasses, with every problem reported as "file:line: what is wrong".

Imports: errors, yamlfile, sqlalchemy.engine.make_url (parsing only; no engine is built).

Owns the schema of gateway.yaml (README "Configuration reference"), its defaults, the
environment overrides (GATEWAY_STORE_URL, GATEWAY_PROXY_LISTEN,
GATEWAY_ADMIN_LISTEN, GATEWAY_RATE_LIMIT_STORE_URL), the list of every GATEWAY_* variable
(others are warned about: README "Environment variables"), and resolving relative paths against
the directory of the config file, so the CLI and the server always open the same store. Validation
collects all problems before raising one ConfigError, so `gateway check` shows
everything that is wrong at once. Field meanings are documented at the fields.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.errors import ConfigError
from gateway.listener_tls import ListenerTls, check_pair
from gateway.ratelimit import Limit, limit_problems, make_limit
from gateway.timeparse import parse_duration
from gateway.upstream_tls import UpstreamTls
from gateway.yamlfile import HTTP_TOKEN_RE, LineDict, LineList, Validator, load_yaml_mapping

Address = tuple[str, int]  # host, port

_ALLOW = ("Authorization", "Content-Type")
_EXPOSE = ("X-Request-Id",)
LOG_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_MAX_BODY = 1_073_741_824
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """A route's `cors` block: the gateway answers CORS itself on this route."""

    store: bool  # origins come from service users' allowed_origins (`origins: store`, the default)
    extra: tuple[str, ...]  # fixed origins valid for every user on the route (normalised)
    allow_headers: tuple[str, ...] = _ALLOW
    expose_headers: tuple[str, ...] = _EXPOSE
    max_age: int = 600  # seconds a browser may cache a preflight answer


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One `routes[]` entry: a path prefix mapped to one upstream."""

    name: str  # policies/ refer to the route by this name
    prefix: str  # "/orders" matches /orders, /orders/ and /orders/..., never /ordersX
    upstream: str  # http(s)://host[:port][/base-path], trailing "/" stripped
    timeout: float = 30.0  # seconds to response headers and between body chunks
    strip_prefix: bool = False  # send the path without the prefix ("/orders" → "/")
    preserve_host: bool = False  # forward the client's Host instead of the upstream's
    max_body: int | None = None  # request body limit in bytes; None = Config.max_body
    max_connections: int = 100  # size of this route's upstream connection pool
    cors: CorsConfig | None = None  # None: CORS is left to the upstream
    tls: UpstreamTls | None = None  # how to talk TLS to an https upstream (None: the defaults)
    websocket: bool = False  # WebSocket handshakes are authorised and relayed (README "WebSocket")
    assertion: bool = False  # forwarded requests carry a signed identity assertion (a JWT)
    rate_limit: Limit | None = None  # each service user on this route (README "Rate limits")
    source: str = ""  # "file:line" of the route, for messages


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """How the gateway signs the JWTs it mints (README "API keys and short-lived tokens")."""

    alg: str = "ES256"  # or EdDSA
    issuer: str = "gateway"  # the `iss` claim: set it to the gateway's external URL
    audience: str = "gateway"  # the `aud` claim of access tokens
    token_ttl: float = 3600.0  # seconds an access token lives (at most 86400)
    publish_ahead: float = 300.0  # seconds a rotated key is published before it signs
    # The sealing secret's file when GATEWAY_SECRET_KEY is not set (absolute after load_config);
    # None: gateway.secret beside the config file.
    secret_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """The `rate_limits` block (README "Rate limits"); no limit is set by default."""

    # "memory" (each process counts alone) or a redis:// / rediss:// URL, which may hold a password
    store: str = field(default="memory", repr=False)
    on_store_error: str = "allow"  # or "deny": 503 store_unavailable while Redis cannot be reached
    per_user: Limit | None = None  # each service user, all routes together
    auth_failures: Limit | None = None  # failed credential checks per client address


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """How a stopping process drains (README "Shutdown and drain")."""

    drain_delay: float = 5.0  # seconds /readyz is 503 while both listeners still serve
    timeout: float = 30.0  # seconds in-flight requests and streams get after the listeners close


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """Names of the identity headers sent upstream."""

    user_header: str = "X-Service-User"
    roles_header: str = "X-Service-User-Roles"
    token_id_header: str = "X-Service-Token-Id"  # noqa: S105 -- a header name, not a secret
    assertion_header: str = "X-Service-User-Assertion"  # the signed assertion (routes with `assertion`)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long the store keeps change-feed and audit rows (README "Retention"); None = for ever."""

    changes: float | None = 3600.0
    audit_events: float | None = 365 * 86400.0


# Below a minute a gateway that missed a few polls would have to drop its whole cache.
MIN_RETENTION = 60.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Identity cache tuning (decisions are never cached)."""

    ttl: float = 60.0  # seconds a known token's identity is kept
    negative_ttl: float = 5.0  # seconds an unknown token is remembered as unknown
    max_entries: int = 100_000
    outage_grace: float = 5.0  # seconds cached identities still serve while the store is unreachable


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """How long and how many clients may hold the gateway (README "Slow clients")."""

    max_connections: int = 8192  # open client connections per process; more are closed at once
    header_timeout: float = 10.0  # seconds from a request's first byte (or the accept) to its whole head
    body_timeout: float = 30.0  # seconds a request body may pause between two chunks
    send_timeout: float = 30.0  # seconds a client may take no bytes of its response


@dataclass(frozen=True, slots=True)
class Config:
    """The whole of gateway.yaml, resolved (absolute paths, env overrides applied)."""

    path: Path  # absolute path of the config file
    proxy_listen: Address = ("127.0.0.1", 8080)
    admin_listen: Address = ("127.0.0.1", 8081)
    proxy_tls: ListenerTls | None = None  # the proxy listener serves HTTPS
    admin_tls: ListenerTls | None = None
    # "file:line: ..." and "GATEWAY_X: ..." (unknown variables) worth logging at start, not fatal
    warnings: tuple[str, ...] = ()
    # sqlite+aiosqlite:////abs/path.db or postgresql+asyncpg://...; may hold a password, so not in repr
    store_url: str = field(default="", repr=False)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    policies_path: Path = Path("policies")  # absolute after load_config
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Peers that may ask /.gateway/authz for decisions (README "Forward-auth"); none by default.
    forward_auth_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    routes: tuple[RouteConfig, ...] = ()
    max_body: int = _DEFAULT_MAX_BODY  # default request body limit, bytes (1 GiB)
    keepalive_timeout: float = 75.0  # client keep-alive idle timeout, seconds
    client: ClientLimits = field(default_factory=lambda: ClientLimits())
    admin_cors_origins: tuple[str, ...] = ()  # origins allowed to call the admin API from a browser
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    log_level: str = "info"


_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ListenSchemeError(ValueError):
    """parse_listen was given a URL ("https://127.0.0.1:8443"): a listener is HOST:PORT, and HTTPS is
    a `tls` block beside it, which only the caller (a gateway.yaml key, a variable) can point at."""

    def __init__(self, text: str, scheme: str, address: str | None) -> None:
        example = f' ("{address}")' if address else ""
        super().__init__(f"{text!r}: write HOST:PORT without a scheme{example}")
        self.scheme = scheme  # lower case: "https", "http", …
        self.address = address or "HOST:PORT"  # the URL's HOST:PORT, if it has a valid one


def parse_listen(text: str) -> Address:
    """Parse "HOST:PORT" (IPv6 as "[::1]:8080") into (host, port); ValueError with a clear message.

    A URL raises ListenSchemeError: without that check "https://127.0.0.1:8443" splits into the
    host "https://127.0.0.1" and is refused as an IPv6 address missing its brackets (issue 15).
    """
    scheme = _SCHEME_RE.match(text)
    if scheme is not None:
        address: str | None = text[scheme.end() :].split("/", 1)[0]
        try:
            parse_listen(address or "")
        except ValueError:
            address = None
        raise ListenSchemeError(text, scheme.group(1).lower(), address)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} must be HOST:PORT, e.g. 127.0.0.1:8080")
    # Port 0 (the system picks a free port) is for tests and tools that read the bound port back.
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535 (or 0: any free port)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port_text)
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    if ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not _HOST_RE.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host, int(port_text)


def normalize_origin(text: str) -> str:
    """Normalise a browser origin to "scheme://host[:port]"; ValueError(message) when it is not one."""
    if text == "null":
        raise ValueError("'null' is not an allowed origin (sandboxed pages and local files all send it)")
    if "*" in text:
        raise ValueError(f"{text!r}: wildcard origins are not allowed; list each origin")
    try:
        parts = urlsplit(text)
        port = parts.port
        scheme, host = parts.scheme.lower(), parts.hostname or ""
        if scheme not in ("http", "https") or not text.lower().startswith(f"{scheme}://") or not host:
            raise ValueError("it must start with http:// or https:// and name a host")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an origin: {exc}") from None
    if any(ch.isspace() or ord(ch) < 0x20 for ch in text) or "@" in parts.netloc:
        raise ValueError(f"{text!r} is not an origin: no spaces, user names or passwords")
    if parts.query or parts.fragment or "?" in text or "#" in text or parts.path not in ("", "/"):
        raise ValueError(f"{text!r}: an origin has no path, query or fragment (only scheme://host[:port])")
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        try:
            # Browsers send IDN hosts in their ASCII (punycode) form.
            host = host if host.isascii() else host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not _HOST_RE.match(host):
            raise ValueError(f"{text!r}: {parts.hostname!r} is not a valid host name")
    if port == 0:
        raise ValueError(f"{text!r}: port 0 is not a port")
    suffix = f":{port}" if port is not None and port != (80 if scheme == "http" else 443) else ""
    return f"{scheme}://{host}{suffix}"


_SQLITE, _POSTGRES = "sqlite+aiosqlite", "postgresql+asyncpg"
_DRIVERS = {"sqlite": _SQLITE, _SQLITE: _SQLITE, "postgres": _POSTGRES, "postgresql": _POSTGRES}
_DRIVERS[_POSTGRES] = _POSTGRES
_STORE_HINT = "use sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST/DB"


def _store_url(text: str, base: Path) -> str:
    """Resolve a store URL; ValueError(message) when unusable. Relative SQLite paths join `base`."""
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ValueError(f"is not a database URL; {_STORE_HINT}") from None
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ValueError(f"unsupported database {url.drivername!r}; {_STORE_HINT}")
    url = url.set(drivername=driver)
    if driver == _SQLITE:
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            # The CLI and the server are separate processes: they must share one file.
            raise ValueError("an in-memory SQLite store cannot be shared by the CLI and the server")
        if database.startswith("file:"):
            raise ValueError("write the SQLite file as a path (sqlite+aiosqlite:///FILE), not a file: URI")
        url = url.set(database=os.path.normpath(base / database))
    return url.render_as_string(hide_password=False)


# Every GATEWAY_* variable the gateway reads (README "Environment variables"). GATEWAY_CONFIG is
# read by the CLI before any config exists and GATEWAY_SECRET_KEY by keyring, but they belong here
# all the same: this list is what an unknown name is checked against.
ENV_VARIABLES = (
    "GATEWAY_CONFIG",
    "GATEWAY_STORE_URL",
    "GATEWAY_PROXY_LISTEN",
    "GATEWAY_ADMIN_LISTEN",
    "GATEWAY_RATE_LIMIT_STORE_URL",
    "GATEWAY_SECRET_KEY",
)
# Not read yet, but taken by the coming remote CLI (commands against a running gateway's admin
# API): a deployment that sets them early is not making a typo.
RESERVED_VARIABLES = ("GATEWAY_ADMIN_URL", "GATEWAY_ADMIN_TOKEN")
# Prefixes that belong to this repository's tooling, never to the gateway, whose processes inherit
# them: GATEWAY_TEST_ is reserved for the test suite (GATEWAY_TEST_PG, GATEWAY_TEST_REDIS_DB, …) and
# GATEWAY_BENCH_ for bench/run.py (GATEWAY_BENCH_PG). The gateway never reads a name under them.
TOOLING_PREFIXES = ("GATEWAY_TEST_", "GATEWAY_BENCH_")
# Kubernetes' service links (a pod's default, enableServiceLinks): a Service named `gateway`, or
# `gateway-admin` and other `gateway-…`, in the pod's namespace injects GATEWAY_SERVICE_HOST,
# GATEWAY_SERVICE_PORT[_<PORT NAME>], GATEWAY_PORT and GATEWAY_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]
# (GATEWAY_ADMIN_SERVICE_HOST, … for gateway-admin). They are not typos; their values are checked
# too, so that GATEWAY_PROXY_PORT=9090 (someone hoping to set the port) is still reported.
_LINK_PORT = r"PORT_[0-9]+_(?:TCP|UDP|SCTP)"
# (how the name ends after GATEWAY[_<rest of the Service's name>], the value's shape). A name may
# fit several (GATEWAY_ADMIN_PORT_8081_TCP_PORT: gateway-admin's port 8081, or the PORT of a
# Service gateway-admin-port-8081-tcp), so a variable passes when one fits name and value both.
_SERVICE_LINKS = tuple(
    (re.compile(rf"GATEWAY(?:_[A-Z0-9_]+)?_(?:{name})"), re.compile(value))
    for name, value in (
        ("SERVICE_HOST", r".+"),
        (r"SERVICE_PORT(?:_[A-Z0-9_]+)?", r"[0-9]+"),
        (rf"PORT|{_LINK_PORT}", r"(?:tcp|udp|sctp)://.+"),
        (rf"{_LINK_PORT}_PROTO", r"tcp|udp|sctp"),
        (rf"{_LINK_PORT}_PORT", r"[0-9]+"),
        (rf"{_LINK_PORT}_ADDR", r".+"),
    )
)

_ROOT_KEYS = (
    "listeners",
    "store",
    "policies",
    "trusted_proxies",
    "forward_auth",
    "identity",
    "cache",
    "routes",
    "limits",
    "admin",
    "shutdown",
    "signing",
    "rate_limits",
    "log_level",
)


def _is_service_link(name: str, value: str) -> bool:
    """Whether `name`=`value` has the shape of a variable Kubernetes injects for a Service."""
    return any(shape.fullmatch(name) and values.fullmatch(value) for shape, values in _SERVICE_LINKS)


def environment_warnings(env: Mapping[str, str]) -> list[str]:
    """One warning per GATEWAY_* variable the gateway does not read, sorted by name.

    Such a variable is ignored, and silently ignoring it hid typos (GATEWAY_STORE_URI: the
    gateway ran on the SQLite default) and settings that live in gateway.yaml only
    (GATEWAY_LOG_LEVEL). Only names are quoted, never values (they may hold secrets).
    """
    known = (*ENV_VARIABLES, *RESERVED_VARIABLES)
    suffixes = {name.removeprefix("GATEWAY_"): name for name in ENV_VARIABLES}
    warnings = []
    for name in sorted(env):
        if not name.startswith("GATEWAY_") or name in known or name.startswith(TOOLING_PREFIXES):
            continue
        if _is_service_link(name, env[name]):
            continue
        suffix = name.removeprefix("GATEWAY_")
        close = difflib.get_close_matches(suffix, suffixes, n=1, cutoff=0.7)
        if suffix.lower() in _ROOT_KEYS:
            hint = f"{suffix.lower()} is set in gateway.yaml"
        elif close:
            hint = f"did you mean {suffixes[close[0]]}?"
        else:
            hint = f"the gateway reads {', '.join(ENV_VARIABLES[:-1])} and {ENV_VARIABLES[-1]}"
        warnings.append(f"{name}: unknown environment variable (ignored); {hint}")
    return warnings


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate gateway.yaml; raise ConfigError listing every problem as "file:line: ...".

    `env` (default os.environ) supplies GATEWAY_STORE_URL / GATEWAY_PROXY_LISTEN /
    GATEWAY_ADMIN_LISTEN / GATEWAY_RATE_LIMIT_STORE_URL; an empty variable counts as unset. Any
    other GATEWAY_* variable of `env` becomes a warning (environment_warnings).
    """
    env = os.environ if env is None else env
    display = str(path)
    absolute = Path(os.path.abspath(path))
    base = absolute.parent
    root = load_yaml_mapping(Path(path), display)
    f = Validator(display)
    f.keys(root, "", _ROOT_KEYS)

    listeners = f.mapping(root, "listeners", "", ("proxy", "admin"))
    warnings: list[str] = []
    found = {key: _listen(f, listeners, key, base, warnings) for key in ("proxy", "admin")}
    listen = {key: address for key, (address, _) in found.items()}
    store = f.mapping(root, "store", "", ("url", "retention"))
    store_url = ""
    try:
        store_url = _store_url(f.string(store, "url", "store") or "sqlite+aiosqlite:///gateway.db", base)
    except ValueError as exc:
        f.add(store.line_of("url"), "store.url", str(exc))
    retention = _retention(f, f.mapping(store, "retention", "store", ("changes", "audit_events")))
    policies = f.string(root, "policies", "")
    if policies == "":
        f.add(root.line_of("policies"), "policies", "must name a folder or file")

    trusted = f.strings(root, "trusted_proxies", "", _network)
    forward_auth = f.mapping(root, "forward_auth", "", ("peers",))
    peers = f.strings(forward_auth, "peers", "forward_auth", _network)

    identity = _identity(f, f.mapping(root, "identity", "", _IDENTITY_KEYS))
    node = f.mapping(root, "cache", "", ("ttl", "negative_ttl", "max_entries", "outage_grace"))
    cache = CacheConfig(
        ttl=f.number(node, "ttl", "cache", _CACHE.ttl, allow_zero=True),
        negative_ttl=f.number(node, "negative_ttl", "cache", _CACHE.negative_ttl, allow_zero=True),
        max_entries=f.integer(node, "max_entries", "cache", _CACHE.max_entries),
        outage_grace=f.number(node, "outage_grace", "cache", _CACHE.outage_grace, allow_zero=True),
    )
    limits = f.mapping(
        root,
        "limits",
        "",
        (
            "max_body",
            "keepalive_timeout",
            "max_connections",
            "header_timeout",
            "body_timeout",
            "send_timeout",
        ),
    )
    admin = f.mapping(root, "admin", "", ("cors_origins",))
    node = f.mapping(root, "shutdown", "", ("drain_delay", "timeout"))
    shutdown = ShutdownConfig(
        drain_delay=f.number(node, "drain_delay", "shutdown", _SHUTDOWN.drain_delay, allow_zero=True),
        timeout=f.number(node, "timeout", "shutdown", _SHUTDOWN.timeout, allow_zero=True),
    )
    signing = _signing(f, f.mapping(root, "signing", "", _SIGNING_KEYS), base)
    rate_limits = _rate_limits(f, f.mapping(root, "rate_limits", "", _RATE_LIMIT_KEYS), env)
    log_level = (f.string(root, "log_level", "") or "info").lower()
    if log_level not in LOG_LEVELS:
        f.add(root.line_of("log_level"), "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    routes = _routes(f, root, base)
    max_body = f.integer(limits, "max_body", "limits", _DEFAULT_MAX_BODY)
    keepalive = f.number(limits, "keepalive_timeout", "limits", 75.0)
    client = ClientLimits(
        max_connections=f.integer(limits, "max_connections", "limits", _CLIENT.max_connections),
        header_timeout=f.number(limits, "header_timeout", "limits", _CLIENT.header_timeout),
        body_timeout=f.number(limits, "body_timeout", "limits", _CLIENT.body_timeout),
        send_timeout=f.number(limits, "send_timeout", "limits", _CLIENT.send_timeout),
    )
    admin_origins = tuple(dict.fromkeys(f.strings(admin, "cors_origins", "admin", normalize_origin)))

    for variable, key in (("GATEWAY_PROXY_LISTEN", "proxy"), ("GATEWAY_ADMIN_LISTEN", "admin")):
        if env.get(variable):
            try:
                listen[key] = parse_listen(env[variable])
            except ListenSchemeError as exc:
                # The variable sets only the address: the file's tls block (if any) still applies.
                hint = (
                    f"; HTTPS is the tls block of listeners.{key} in gateway.yaml {_TLS_README}, "
                    f"and {variable} then sets only its HOST:PORT"
                    if exc.scheme == "https" and found[key][1] is None
                    else ""
                )
                f.problems.append(f"{variable}: {exc}{hint}")
            except ValueError as exc:
                f.problems.append(f"{variable}: {exc}")
    if env.get("GATEWAY_STORE_URL"):
        try:
            # Not written in a file, so a relative SQLite path is relative to where we run.
            store_url = _store_url(env["GATEWAY_STORE_URL"], Path.cwd())
        except ValueError as exc:
            f.problems.append(f"GATEWAY_STORE_URL: {exc}")

    if f.problems:
        raise ConfigError(f.sorted_problems())
    warnings.extend(environment_warnings(env))
    return Config(
        path=absolute,
        proxy_listen=listen["proxy"],
        admin_listen=listen["admin"],
        proxy_tls=found["proxy"][1],
        admin_tls=found["admin"][1],
        warnings=tuple(warnings),
        store_url=store_url,
        retention=retention,
        policies_path=Path(os.path.normpath(base / (policies or "policies"))),
        trusted_proxies=tuple(trusted),
        forward_auth_peers=tuple(peers),
        identity=identity,
        cache=cache,
        routes=routes,
        max_body=max_body,
        keepalive_timeout=keepalive,
        client=client,
        admin_cors_origins=admin_origins,
        shutdown=shutdown,
        signing=signing,
        rate_limits=rate_limits,
        log_level=log_level,
    )


_CACHE = CacheConfig()
_CLIENT = ClientLimits()
_SHUTDOWN = ShutdownConfig()
_IDENTITY_KEYS = ("user_header", "roles_header", "token_id_header", "assertion_header")
_LISTEN_DEFAULTS: dict[str, Address] = {"proxy": ("127.0.0.1", 8080), "admin": ("127.0.0.1", 8081)}
# Headers the gateway manages itself: an identity header with one of these names
# would either be dropped as hop-by-hop or collide with what the proxy sets.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "cookie",
        "expect",
        "origin",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "x-request-id",
    }
)


def _listen(
    f: Validator, node: LineDict, key: str, base: Path, warnings: list[str]
) -> tuple[Address, ListenerTls | None]:
    """A listener: "HOST:PORT", or {listen: "HOST:PORT", tls: {...}} (README "TLS on the listeners")."""
    where = f"listeners.{key}"
    item = node.get(key)
    tls: ListenerTls | None = None
    if isinstance(item, LineDict):
        f.keys(item, where, ("listen", "tls"))
        text = f.string(item, "listen", where, required=True)
        line = item.line_of("listen")
        if "tls" in item:
            tls = _listener_tls(f, item, where, base, warnings)
    else:
        text = f.string(node, key, "listeners")
        line = node.line_of(key)
    if text is not None:
        try:
            return parse_listen(text), tls
        except ListenSchemeError as exc:
            hint = "" if tls is not None else _https_hint(exc, isinstance(item, LineDict))
            f.add(line, where, f"{exc}{hint}")
        except ValueError as exc:
            f.add(line, where, str(exc))
    return _LISTEN_DEFAULTS[key], tls


_TLS_README = '(README "TLS on the listeners")'
_TLS_BLOCK = "tls: {cert_file: ..., key_file: ...}"


def _https_hint(exc: ListenSchemeError, object_form: bool) -> str:
    """Where HTTPS is configured, for a listener written as an https:// URL ("" for other schemes)."""
    if exc.scheme != "https":
        return ""
    if object_form:
        return f"; for HTTPS add {_TLS_BLOCK} beside listen {_TLS_README}"
    return f'; for HTTPS use {{listen: "{exc.address}", {_TLS_BLOCK}}} {_TLS_README}'


def _listener_tls(
    f: Validator, item: LineDict, where: str, base: Path, warnings: list[str]
) -> ListenerTls | None:
    node = f.mapping(item, "tls", where, ("cert_file", "key_file", "key_password_file", "min_version"))
    where, line = f"{where}.tls", item.line_of("tls")
    paths: dict[str, str | None] = {}
    for name in ("cert_file", "key_file", "key_password_file"):
        text = f.string(node, name, where, required=name != "key_password_file")
        paths[name] = os.path.normpath(base / text) if text else None
        found = paths[name]
        if found is not None and not os.access(found, os.R_OK):
            f.add(node.line_of(name), f"{where}.{name}", f"cannot read {text!r}")
            return None
    version = node.get("min_version", "1.2")
    if isinstance(version, float):
        version = f"{version:.1f}"  # `min_version: 1.3` unquoted is a YAML number
    if version not in ("1.2", "1.3"):
        f.add(node.line_of("min_version"), f"{where}.min_version", 'must be "1.2" or "1.3"')
        return None
    cert, key = paths["cert_file"], paths["key_file"]
    if cert is None or key is None:
        return None
    tls = ListenerTls(cert, key, paths["key_password_file"], str(version))
    try:
        warning = check_pair(tls)
    except ValueError as exc:
        f.add(line, where, str(exc))
        return None
    if warning is not None:
        warnings.append(f"{f.file}:{line}: {where}: {warning}")
    return tls


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None


def _header_name(text: str) -> str:
    if not HTTP_TOKEN_RE.match(text):
        raise ValueError(f"{text!r} is not a valid HTTP header name")
    return text


def _header_names(f: Validator, node: LineDict, key: str, where: str) -> tuple[str, ...]:
    unique: dict[str, str] = {}  # header names are case-insensitive: keep the first spelling
    for name in f.strings(node, key, where, _header_name):
        unique.setdefault(name.lower(), name)
    return tuple(unique.values())


_SIGNING_KEYS = ("alg", "issuer", "audience", "token_ttl", "publish_ahead", "secret_key_file")
_MAX_TOKEN_TTL = 86400.0  # one day, as Webscale's


def _signing(f: Validator, node: LineDict, base: Path) -> SigningConfig:
    defaults = SigningConfig()
    alg = f.string(node, "alg", "signing") or defaults.alg
    if alg not in ("ES256", "EdDSA"):
        f.add(node.line_of("alg"), "signing.alg", f"must be ES256 or EdDSA, not {alg!r}")
    ttl = f.number(node, "token_ttl", "signing", defaults.token_ttl)
    if ttl > _MAX_TOKEN_TTL:
        f.add(node.line_of("token_ttl"), "signing.token_ttl", "must be at most 86400 (one day)")
    issuer = f.string(node, "issuer", "signing") or defaults.issuer
    audience = f.string(node, "audience", "signing") or defaults.audience
    secret = f.string(node, "secret_key_file", "signing")
    return SigningConfig(
        alg=alg,
        issuer=issuer,
        audience=audience,
        token_ttl=ttl,
        publish_ahead=f.number(node, "publish_ahead", "signing", defaults.publish_ahead, allow_zero=True),
        secret_key_file=None if not secret else Path(os.path.normpath(base / secret)),
    )


def _retention(f: Validator, node: LineDict) -> RetentionConfig:
    kept: dict[str, float | None] = {}
    for key in ("changes", "audit_events"):
        default = getattr(RetentionConfig(), key)
        value = node.get(key, default)
        if value == "never":
            kept[key] = None
            continue
        if value is None or value == default:
            kept[key] = default
            continue
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            f.add(node.line_of(key), f"store.retention.{key}", f"{exc}, or never")
            continue
        if seconds < MIN_RETENTION:
            f.add(
                node.line_of(key), f"store.retention.{key}", f"must be at least 1m (or never), not {value!r}"
            )
            continue
        kept[key] = seconds
    return RetentionConfig(**kept)


_RATE_LIMIT_KEYS = ("store", "on_store_error", "per_user", "auth_failures")
_LIMIT_KEYS = ("rate", "per", "burst")
_RATE_STORE_HINT = "must be memory, redis://[user:password@]host[:port][/db] or rediss://… (TLS)"


def _rate_limits(f: Validator, node: LineDict, env: Mapping[str, str]) -> RateLimitConfig:
    store = f.string(node, "store", "rate_limits") or "memory"
    where = "rate_limits.store"
    problem = rate_store_problem(store)
    if problem:
        f.add(node.line_of("store"), where, problem)
    if env.get("GATEWAY_RATE_LIMIT_STORE_URL"):
        store = env["GATEWAY_RATE_LIMIT_STORE_URL"]
        problem = rate_store_problem(store)
        if problem:
            f.problems.append(f"GATEWAY_RATE_LIMIT_STORE_URL: {problem}")
    on_error = f.string(node, "on_store_error", "rate_limits") or "allow"
    if on_error not in ("allow", "deny"):
        f.add(node.line_of("on_store_error"), "rate_limits.on_store_error", "must be allow or deny")
    return RateLimitConfig(
        store=store,
        on_store_error=on_error,
        per_user=_limit(f, node, "per_user", "rate_limits"),
        auth_failures=_limit(f, node, "auth_failures", "rate_limits"),
    )


def rate_store_problem(text: str) -> str | None:
    """Why `text` is not a rate-limit store (never quoting it: it may hold a password); None if it is."""
    if text == "memory":
        return None
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        return f"{_RATE_STORE_HINT}; the port is not a number"
    if url.scheme not in ("redis", "rediss"):
        return _RATE_STORE_HINT
    if not url.hostname:
        return f"{_RATE_STORE_HINT}; the host is missing"
    if port == 0:
        return f"{_RATE_STORE_HINT}; port 0 is not a port"
    database = url.path.strip("/")
    if database and not database.isdigit():
        # Not quoted: a password with an unencoded "/" would be split into it.
        return f"{_RATE_STORE_HINT}; the database must be a number (percent-encode a '/' in the password)"
    if url.query or url.fragment:
        return f"{_RATE_STORE_HINT}; no query or fragment"
    return None


def _limit(f: Validator, node: LineDict, key: str, where: str) -> Limit | None:
    """A `{rate, per, burst}` mapping at `key` (None when absent or null)."""
    if node.get(key) is None:
        return None
    item = f.mapping(node, key, where, _LIMIT_KEYS)
    if not isinstance(node[key], LineDict):
        return None  # reported by f.mapping
    path = f"{where}.{key}" if where else key
    problems = limit_problems(item.get("rate"), item.get("per"), item.get("burst"))
    for field_name, what in problems:
        if field_name in item:
            f.add(item.line_of(field_name), f"{path}.{field_name}", what)
        else:
            f.add(item.line, f"{path}.{field_name}", "is required")
    if problems:
        return None
    return make_limit(item.get("rate"), item.get("per"), item.get("burst"))


def _identity(f: Validator, node: LineDict) -> IdentityConfig:
    values: list[str] = []
    seen: dict[str, str] = {}
    for key in _IDENTITY_KEYS:
        value = f.string(node, key, "identity")
        if value is None:
            value = str(getattr(IdentityConfig(), key))
        elif not HTTP_TOKEN_RE.match(value):
            f.add(node.line_of(key), f"identity.{key}", f"{value!r} is not a valid HTTP header name")
        elif value.lower() in _RESERVED_HEADERS:
            f.add(node.line_of(key), f"identity.{key}", f"{value!r} is set by the gateway itself")
        # The proxy strips inbound copies that differ by case, "_" or "." (upstreams
        # fold those together), so the three names must differ after that folding too.
        folded = value.lower().replace("_", "-").replace(".", "-")
        if folded in seen:
            f.add(node.line_of(key), f"identity.{key}", f"must differ from identity.{seen[folded]}")
        seen.setdefault(folded, key)
        values.append(value)
    return IdentityConfig(*values)


_ROUTE_KEYS = (
    "name",
    "prefix",
    "upstream",
    "timeout",
    "strip_prefix",
    "preserve_host",
    "max_body",
    "max_connections",
    "cors",
    "tls",
    "websocket",
    "assertion",
    "rate_limit",
)
_TLS_KEYS = ("ca_file", "cert_file", "key_file", "server_name", "verify")


def _routes(f: Validator, root: LineDict, base: Path) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    prefixes: dict[str, tuple[str, int]] = {}
    for item, line, where in f.items(root, "routes", ""):
        if not isinstance(item, LineDict):
            f.add(line, where, "must be a mapping with name, prefix and upstream")
            continue
        f.keys(item, where, _ROUTE_KEYS)
        name = f.string(item, "name", where, required=True) or ""
        if name and not NAME_RE.match(name):
            f.add(item.line_of("name"), f"{where}.name", f"must match {NAME_RE.pattern}")
        elif name in names:
            f.add(
                item.line_of("name"),
                f"{where}.name",
                f"route {name!r} is already defined at line {names[name]}",
            )
        names.setdefault(name, item.line_of("name"))
        prefix = f.string(item, "prefix", where, required=True) or ""
        problem = _prefix_problem(prefix) if prefix else None
        if problem:
            f.add(item.line_of("prefix"), f"{where}.prefix", problem)
        elif prefix in prefixes:
            other, other_line = prefixes[prefix]
            f.add(
                item.line_of("prefix"),
                f"{where}.prefix",
                f"{prefix!r} is already the prefix of route {other!r} (line {other_line})",
            )
        prefixes.setdefault(prefix, (name, item.line_of("prefix")))
        upstream = f.string(item, "upstream", where, required=True) or ""
        try:
            upstream = _upstream(upstream) if upstream else ""
        except ValueError as exc:
            f.add(item.line_of("upstream"), f"{where}.upstream", str(exc))
        routes.append(
            RouteConfig(
                name=name,
                prefix=prefix,
                upstream=upstream,
                timeout=f.number(item, "timeout", where, 30.0),
                strip_prefix=f.boolean(item, "strip_prefix", where, False),
                preserve_host=f.boolean(item, "preserve_host", where, False),
                max_body=f.integer(item, "max_body", where, 0) or None,
                max_connections=f.integer(item, "max_connections", where, 100),
                cors=_cors(f, item["cors"], item.line_of("cors"), f"{where}.cors")
                if "cors" in item
                else None,
                tls=_tls(f, item, where, upstream, base) if "tls" in item else None,
                websocket=f.boolean(item, "websocket", where, False),
                assertion=f.boolean(item, "assertion", where, False),
                rate_limit=_limit(f, item, "rate_limit", where),
                source=f"{f.file}:{line}",
            )
        )
    return tuple(routes)


def _tls(f: Validator, item: LineDict, where: str, upstream: str, base: Path) -> UpstreamTls | None:
    """A route's `tls` block, its files read once here so a bad one is a `file:line` problem."""
    node = f.mapping(item, "tls", where, _TLS_KEYS)
    where, line = f"{where}.tls", item.line_of("tls")
    if upstream and not upstream.startswith("https://"):
        f.add(line, where, "needs an https:// upstream")
        return None
    paths: dict[str, str | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        text = f.string(node, key, where)
        paths[key] = os.path.normpath(base / text) if text else None
        found = paths[key]
        if found is not None and not os.access(found, os.R_OK):
            f.add(node.line_of(key), f"{where}.{key}", f"cannot read {text!r}")
            return None
    if (paths["cert_file"] is None) != (paths["key_file"] is None):
        f.add(line, where, "cert_file and key_file go together (the client certificate and its key)")
        return None
    server_name = f.string(node, "server_name", where)
    if server_name is not None and not _HOST_RE.match(server_name):
        f.add(node.line_of("server_name"), f"{where}.server_name", "must be a host name")
        return None
    tls = UpstreamTls(
        ca_file=paths["ca_file"],
        cert_file=paths["cert_file"],
        key_file=paths["key_file"],
        server_name=server_name,
        verify=f.boolean(node, "verify", where, True),
    )
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (ssl.SSLError, OSError) as exc:
        f.add(node.line_of("ca_file"), f"{where}.ca_file", f"is not a PEM CA bundle ({_ssl_reason(exc)})")
        return None
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (ssl.SSLError, OSError) as exc:
            f.add(
                node.line_of("key_file"),
                f"{where}.key_file",
                f"does not match cert_file, or one of them is not PEM ({_ssl_reason(exc)})",
            )
            return None
    return tls


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    return str(reason or exc)


def _prefix_problem(prefix: str) -> str | None:
    if not prefix.startswith("/"):
        return "must start with '/'"
    if prefix != "/" and prefix.endswith("/"):
        return "must not end with '/' (the prefix '/orders' already matches '/orders/...')"
    if "//" in prefix:
        return "must not contain '//'"
    for bad in ("%", "?", "#", ";", "\\", "*"):
        if bad in prefix:
            return f"must not contain {bad!r} (prefixes match the decoded, canonical path)"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        return "must not contain spaces or control characters"
    if any(segment in (".", "..") for segment in prefix.split("/")):
        return "must not contain '.' or '..' segments"
    if prefix.split("/", 2)[1] == ".gateway":
        return "must not be under /.gateway/ (the gateway's own endpoints: forward-auth, token exchange)"
    return None


def _upstream(text: str) -> str:
    """Validate and normalise an upstream URL; ValueError(message) when it is not one."""
    message = "must be an http(s) URL: http(s)://host[:port][/base-path]"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(message) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ValueError(message)
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@)")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("must not contain a query or fragment")
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"


def _cors(f: Validator, node: object, line: int, where: str) -> CorsConfig | None:
    if not isinstance(node, LineDict):
        f.add(line, where, "must be a mapping (write `cors: {}` for the defaults)")
        return None
    f.keys(node, where, ("origins", "allow_headers", "expose_headers", "max_age"))
    store, extra = True, tuple[str, ...]()
    origins = node.get("origins")
    if isinstance(origins, LineList):
        store, extra = False, tuple(dict.fromkeys(f.strings(node, "origins", where, normalize_origin)))
    elif isinstance(origins, LineDict):
        # The mapping form defaults to store: true like the other forms.
        f.keys(origins, f"{where}.origins", ("store", "extra"))
        store = f.boolean(origins, "store", f"{where}.origins", True)
        extra = tuple(dict.fromkeys(f.strings(origins, "extra", f"{where}.origins", normalize_origin)))
    elif "origins" in node and origins != "store":
        f.add(
            node.line_of("origins"),
            f"{where}.origins",
            "must be `store`, a list of origins, or {store: true|false, extra: [...]}",
        )
    allow = _header_names(f, node, "allow_headers", where) if "allow_headers" in node else _ALLOW
    expose = _header_names(f, node, "expose_headers", where) if "expose_headers" in node else _EXPOSE
    return CorsConfig(
        store=store,
        extra=extra,
        allow_headers=allow,
        expose_headers=expose,
        max_age=f.integer(node, "max_age", where, 600, allow_zero=True),
    )
