"""gateway.yaml loading: defaults, every error kind at its file:line, env overrides, origins."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest

from gateway.config import (
    CorsConfig,
    load_config,
    normalize_origin,
    parse_listen,
)
from gateway.errors import ConfigError
from gateway.yamlfile import LineDict, LineList, load_yaml

REPO = Path(__file__).resolve().parents[2]

ROUTE = """\
routes:
  - name: orders
    prefix: /orders
    upstream: http://127.0.0.1:9000
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path | str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    assert info.value.problems, "a ConfigError always lists its problems"
    return info.value.problems


# --- yamlfile ---------------------------------------------------------------------------------


def test_yaml_records_lines_and_keeps_yaml12_scalars(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a: yes\nb: on\nc: true\nd: 010\ne: 1:30\nf: 2024-01-01\ng:\n  - x\n  - k: ~\n", "x.yaml"
    )
    data = load_yaml(path)
    assert isinstance(data, LineDict)
    assert data == {
        "a": "yes",
        "b": "on",
        "c": True,
        "d": 10,
        "e": "1:30",
        "f": "2024-01-01",
        "g": ["x", {"k": None}],
    }
    assert data.key_lines == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7}
    items = data["g"]
    assert isinstance(items, LineList) and items.item_lines == [8, 9]
    inner = items[1]
    assert isinstance(inner, LineDict) and inner.line == 9 and inner.key_lines == {"k": 9}


def test_yaml_duplicate_key_reported_at_second_occurrence(tmp_path: Path) -> None:
    path = write(tmp_path, "a: 1\nb:\n  c: 2\n  d: 3\n  c: 4\n", "x.yaml")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert info.value.problems == [f"{path}:5: duplicate key 'c' (first defined at line 3)"]


def test_yaml_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    data = load_yaml(write(tmp_path, "# only a comment\n", "x.yaml"))
    assert isinstance(data, LineDict) and data == {}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a: [1\nb: 2\n", 2, "expected ',' or ']'"),
        ("a: 1\n  b: 2\n", 2, "mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", 2, "expected a single document"),
        ("a: !!python/object:os.system x\n", 1, "could not determine a constructor"),
    ],
)
def test_yaml_syntax_errors_have_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text, "x.yaml")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:{line}: ")
    assert fragment in problem


# --- defaults and resolution ------------------------------------------------------------------


def test_empty_config_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={})
    assert config.path == tmp_path / "gateway.yaml"
    assert config.proxy_listen == ("127.0.0.1", 8080)
    assert config.admin_listen == ("127.0.0.1", 8081)
    assert config.store_url == f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    assert config.policies_path == tmp_path / "policies"
    assert config.trusted_proxies == ()
    assert config.identity.user_header == "X-Service-User"
    assert config.identity.roles_header == "X-Service-User-Roles"
    assert config.identity.token_id_header == "X-Service-Token-Id"
    assert (
        config.cache.ttl,
        config.cache.negative_ttl,
        config.cache.max_entries,
        config.cache.outage_grace,
    ) == (60.0, 5.0, 100_000, 5.0)
    assert config.routes == ()
    assert config.max_body == 1_073_741_824
    assert config.keepalive_timeout == 75.0
    assert config.admin_cors_origins == ()
    assert config.log_level == "info"


def test_full_config_is_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        listeners:
          proxy: "[::1]:9080"
          admin: "localhost:9081"
        store:
          url: "postgres://gw@db.internal/gateway"
        policies: rules/main.yaml
        trusted_proxies: [10.0.0.0/8, 192.168.1.7, "::1"]
        identity:
          user_header: X-User
          roles_header: X-Roles
          token_id_header: X-Token
        cache: {ttl: 0, negative_ttl: 1.5, max_entries: 10, outage_grace: 0}
        limits: {max_body: 1024, keepalive_timeout: 5}
        admin:
          cors_origins: ["HTTPS://Console.Example.com:443/"]
        log_level: DEBUG
        routes:
          - name: orders
            prefix: /orders
            upstream: HTTP://orders.internal:8000/api/
            timeout: 2.5
            strip_prefix: true
            preserve_host: true
            max_body: 2048
            max_connections: 7
            cors:
              origins: {store: false, extra: ["http://a.example:80", "http://[::1]:3000"]}
              allow_headers: [Authorization, X-Custom]
              expose_headers: []
              max_age: 0
          - name: root
            prefix: /
            upstream: https://root.internal
        """,
    )
    config = load_config(path, env={})
    assert config.proxy_listen == ("::1", 9080)
    assert config.admin_listen == ("localhost", 9081)
    assert config.store_url == "postgresql+asyncpg://gw@db.internal/gateway"
    assert config.policies_path == tmp_path / "rules" / "main.yaml"
    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("::1/128"),
    )
    assert (config.identity.user_header, config.identity.roles_header, config.identity.token_id_header) == (
        "X-User",
        "X-Roles",
        "X-Token",
    )
    assert (
        config.cache.ttl,
        config.cache.negative_ttl,
        config.cache.max_entries,
        config.cache.outage_grace,
    ) == (0.0, 1.5, 10, 0.0)
    assert (config.max_body, config.keepalive_timeout) == (1024, 5.0)
    assert config.admin_cors_origins == ("https://console.example.com",)
    assert config.log_level == "debug"
    orders, root = config.routes
    assert orders.upstream == "http://orders.internal:8000/api"
    assert (orders.timeout, orders.strip_prefix, orders.preserve_host) == (2.5, True, True)
    assert (orders.max_body, orders.max_connections) == (2048, 7)
    assert orders.cors == CorsConfig(
        store=False,
        extra=("http://a.example", "http://[::1]:3000"),
        allow_headers=("Authorization", "X-Custom"),
        expose_headers=(),
        max_age=0,
    )
    assert orders.source == f"{path}:18"
    assert (root.prefix, root.upstream, root.cors, root.max_body, root.timeout) == (
        "/",
        "https://root.internal",
        None,
        None,
        30.0,
    )


@pytest.mark.parametrize(
    ("cors", "expected"),
    [
        ("{}", CorsConfig(store=True, extra=())),
        ("{origins: store}", CorsConfig(store=True, extra=())),
        ("{origins: [https://a.example]}", CorsConfig(store=False, extra=("https://a.example",))),
        ("{origins: {extra: [https://a.example]}}", CorsConfig(store=True, extra=("https://a.example",))),
        ("{origins: {store: false}}", CorsConfig(store=False, extra=())),
    ],
)
def test_cors_origin_forms(tmp_path: Path, cors: str, expected: CorsConfig) -> None:
    config = load_config(write(tmp_path, ROUTE + f"    cors: {cors}\n"), env={})
    assert config.routes[0].cors == expected
    assert expected.allow_headers == ("Authorization", "Content-Type")
    assert expected.expose_headers == ("X-Request-Id",) and expected.max_age == 600


def test_relative_sqlite_path_is_relative_to_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, "store:\n  url: sqlite+aiosqlite:///data/../state/gw.db\n")
    assert load_config(path, env={}).store_url == f"sqlite+aiosqlite:///{conf_dir}/state/gw.db"
    write(conf_dir, "store:\n  url: sqlite:///gw.db\n")
    assert load_config(path, env={}).store_url == f"sqlite+aiosqlite:///{conf_dir}/gw.db"
    write(conf_dir, f"store:\n  url: sqlite+aiosqlite:///{tmp_path}/abs.db\n")
    assert load_config(path, env={}).store_url == f"sqlite+aiosqlite:///{tmp_path}/abs.db"
    # Given as a relative path, the config still resolves against its own folder.
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/gateway.yaml", env={})
    assert config.path == conf_dir / "gateway.yaml"
    assert config.store_url == f"sqlite+aiosqlite:///{tmp_path}/abs.db"
    assert config.policies_path == conf_dir / "policies"


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = write(tmp_path, "listeners:\n  proxy: 127.0.0.1:1\nstore:\n  url: sqlite:///file.db\n")
    config = load_config(
        path,
        env={
            "GATEWAY_STORE_URL": "sqlite+aiosqlite:///env.db",
            "GATEWAY_PROXY_LISTEN": "0.0.0.0:9000",
            "GATEWAY_ADMIN_LISTEN": "[::]:9001",
        },
    )
    # Not in a file: relative to the current directory.
    assert config.store_url == f"sqlite+aiosqlite:///{cwd}/env.db"
    assert config.proxy_listen == ("0.0.0.0", 9000)
    assert config.admin_listen == ("::", 9001)
    # Empty variables count as unset.
    config = load_config(path, env={"GATEWAY_STORE_URL": "", "GATEWAY_PROXY_LISTEN": ""})
    assert config.store_url == f"sqlite+aiosqlite:///{tmp_path}/file.db"
    assert config.proxy_listen == ("127.0.0.1", 1)


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_LISTEN", "127.0.0.2:7000")
    assert load_config(write(tmp_path, "")).admin_listen == ("127.0.0.2", 7000)


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("GATEWAY_PROXY_LISTEN", "8080", "must be HOST:PORT"),
        ("GATEWAY_ADMIN_LISTEN", "localhost:http", "port must be a number"),
        ("GATEWAY_STORE_URL", "mysql://u@h/db", "unsupported database 'mysql'"),
        ("GATEWAY_STORE_URL", "sqlite+aiosqlite:///:memory:", "in-memory"),
        ("GATEWAY_STORE_URL", "not a url", "is not a database URL"),
    ],
)
def test_bad_env_override_names_variable(tmp_path: Path, variable: str, value: str, fragment: str) -> None:
    [problem] = problems_of(write(tmp_path, ""), {variable: value})
    assert problem.startswith(f"{variable}: ")
    assert fragment in problem


TLS_HINT = "tls: {cert_file: ..., key_file: ...}"
TLS_README = '(README "TLS on the listeners")'


def test_listener_written_as_url_points_at_the_tls_block(tmp_path: Path) -> None:
    """Issue 15: `proxy: "https://…"` was refused as an IPv6 address missing its brackets."""
    path = write(
        tmp_path,
        """\
        listeners:
          proxy: "https://127.0.0.1:8443"
          admin:
            listen: "http://127.0.0.1:8081/"
        """,
    )
    assert problems_of(path) == [
        f"{path}:2: listeners.proxy: 'https://127.0.0.1:8443': write HOST:PORT without a scheme"
        f' ("127.0.0.1:8443"); for HTTPS use {{listen: "127.0.0.1:8443", {TLS_HINT}}} {TLS_README}',
        f"{path}:4: listeners.admin: 'http://127.0.0.1:8081/': write HOST:PORT without a scheme"
        ' ("127.0.0.1:8081")',
    ]
    # The object form already has the place for tls: say so, not the whole form again.
    path = write(tmp_path, 'listeners:\n  proxy: {listen: "HTTPS://[::1]:8443"}\n')
    assert problems_of(path) == [
        f"{path}:2: listeners.proxy: 'HTTPS://[::1]:8443': write HOST:PORT without a scheme"
        f' ("[::1]:8443"); for HTTPS add {TLS_HINT} beside listen {TLS_README}'
    ]


def test_listen_variable_written_as_url_points_at_the_tls_block(tmp_path: Path) -> None:
    env = {"GATEWAY_PROXY_LISTEN": "https://0.0.0.0:8443", "GATEWAY_ADMIN_LISTEN": "http://gw.example"}
    assert problems_of(write(tmp_path, ""), env) == [
        "GATEWAY_PROXY_LISTEN: 'https://0.0.0.0:8443': write HOST:PORT without a scheme"
        f' ("0.0.0.0:8443"); HTTPS is the tls block of listeners.proxy in gateway.yaml {TLS_README},'
        " and GATEWAY_PROXY_LISTEN then sets only its HOST:PORT",
        "GATEWAY_ADMIN_LISTEN: 'http://gw.example': write HOST:PORT without a scheme",
    ]


# Every variable Kubernetes injects for the Services `gateway` (8080, port named http) and
# `gateway-admin` (8081, port named admin), as deploy/kubernetes/ would create them.
SERVICE_LINKS = {
    "GATEWAY_SERVICE_HOST": "10.96.0.10",
    "GATEWAY_SERVICE_PORT": "8080",
    "GATEWAY_SERVICE_PORT_HTTP": "8080",
    "GATEWAY_PORT": "tcp://10.96.0.10:8080",
    "GATEWAY_PORT_8080_TCP": "tcp://10.96.0.10:8080",
    "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
    "GATEWAY_PORT_8080_TCP_PORT": "8080",
    "GATEWAY_PORT_8080_TCP_ADDR": "10.96.0.10",
    "GATEWAY_ADMIN_SERVICE_HOST": "10.96.0.11",
    "GATEWAY_ADMIN_SERVICE_PORT": "8081",
    "GATEWAY_ADMIN_SERVICE_PORT_ADMIN": "8081",
    "GATEWAY_ADMIN_PORT": "tcp://10.96.0.11:8081",
    "GATEWAY_ADMIN_PORT_8081_TCP": "tcp://10.96.0.11:8081",
    "GATEWAY_ADMIN_PORT_8081_TCP_PROTO": "tcp",
    "GATEWAY_ADMIN_PORT_8081_TCP_PORT": "8081",
    "GATEWAY_ADMIN_PORT_8081_TCP_ADDR": "10.96.0.11",
}
READS = (
    "the gateway reads GATEWAY_CONFIG, GATEWAY_STORE_URL, GATEWAY_PROXY_LISTEN, GATEWAY_ADMIN_LISTEN,"
    " GATEWAY_RATE_LIMIT_STORE_URL and GATEWAY_SECRET_KEY"
)


def test_unknown_gateway_variables_are_warned_about(tmp_path: Path) -> None:
    env = {
        **SERVICE_LINKS,
        "GATEWAY_LOG_LEVEL": "debug",
        "GATEWAY_STORE_URI": "postgresql+asyncpg://u:hunter2@db/gw",
        "GATEWAY_PROXY_PORT": "9090",  # the name of a service link, but not its value
        "GATEWAY_FROBNICATE": "1",
        # Read, reserved for the remote CLI, or the test suite's and bench's own: no warning.
        "GATEWAY_STORE_URL": "sqlite+aiosqlite:///gw.db",
        "GATEWAY_SECRET_KEY": "x" * 32,
        "GATEWAY_CONFIG": "gateway.yaml",
        "GATEWAY_ADMIN_URL": "https://gw.example:8081",
        "GATEWAY_ADMIN_TOKEN": "gw_…",
        "GATEWAY_TEST_PG": "postgresql://postgres@127.0.0.1:5432/test",
        "GATEWAY_BENCH_PG": "postgresql://postgres@127.0.0.1:5432/test",
        "OTHER_LOG_LEVEL": "debug",
    }
    config = load_config(write(tmp_path, ""), env=env)
    assert config.warnings == (
        f"GATEWAY_FROBNICATE: unknown environment variable (ignored); {READS}",
        "GATEWAY_LOG_LEVEL: unknown environment variable (ignored); log_level is set in gateway.yaml",
        f"GATEWAY_PROXY_PORT: unknown environment variable (ignored); {READS}",
        "GATEWAY_STORE_URI: unknown environment variable (ignored); did you mean GATEWAY_STORE_URL?",
    )
    assert "hunter2" not in repr(config.warnings)  # names only, never values
    assert load_config(write(tmp_path, ""), env=SERVICE_LINKS).warnings == ()


def test_every_variable_the_code_names_is_listed() -> None:
    """A GATEWAY_* name in gateway/ that ENV_VARIABLES lacks would be warned about while read."""
    from gateway.config import ENV_VARIABLES, RESERVED_VARIABLES

    named = {
        name
        for source in (REPO / "gateway").rglob("*.py")
        for name in re.findall(r"[\"'](GATEWAY_[A-Z0-9_]*[A-Z0-9])[\"']", source.read_text())
    }
    assert named <= {*ENV_VARIABLES, *RESERVED_VARIABLES}
    assert "GATEWAY_SECRET_KEY" in named and "GATEWAY_CONFIG" in named


def test_missing_unreadable_and_directory_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing) == [f"{missing}: file not found"]
    assert problems_of(tmp_path) == [f"{tmp_path}: is a directory, expected a YAML file"]
    not_mapping = write(tmp_path, "- a\n- b\n")
    assert problems_of(not_mapping) == [f"{not_mapping}:1: the file must be a mapping of keys, not a list"]


# --- errors, each at its file:line ------------------------------------------------------------

ERRORS = [
    # (gateway.yaml, line, message after "file:line: ")
    ("listners:\n  proxy: a\n", 1, "listners: unknown key; did you mean 'listeners'?"),
    (
        "listeners:\n  proxy: 127.0.0.1:8080\n  metrics: x\n",
        3,
        "listeners.metrics: unknown key; expected one of: proxy, admin",
    ),
    ("listeners:\n  proxy: '8080'\n", 2, "listeners.proxy: '8080' must be HOST:PORT, e.g. 127.0.0.1:8080"),
    ("listeners:\n  proxy: 8080\n", 2, "listeners.proxy: must be a string, not a number"),
    (
        "listeners:\n  admin: 'h:70000'\n",
        2,
        "listeners.admin: 'h:70000': the port must be a number from 1 to 65535 (or 0: any free port)",
    ),
    (
        "listeners:\n  admin: '::1:80'\n",
        2,
        "listeners.admin: '::1:80': write an IPv6 address in brackets, e.g. [::1]:8080",
    ),
    ("listeners: [a]\n", 1, "listeners: must be a mapping, not a list"),
    (
        "store:\n  url: mysql://u@h/db\n",
        2,
        "store.url: unsupported database 'mysql'; use sqlite+aiosqlite:///FILE "
        "or postgresql+asyncpg://USER@HOST/DB",
    ),
    (
        "store:\n  url: 'sqlite+aiosqlite:///:memory:'\n",
        2,
        "store.url: an in-memory SQLite store cannot be shared by the CLI and the server",
    ),
    (
        "store:\n  url: 'sqlite://'\n",
        2,
        "store.url: an in-memory SQLite store cannot be shared by the CLI and the server",
    ),
    ("store:\n  url: 5\n", 2, "store.url: must be a string, not a number"),
    ("policies: ''\n", 1, "policies: must name a folder or file"),
    (
        "trusted_proxies:\n  - 10.0.0.0/8\n  - proxy.local\n",
        3,
        "trusted_proxies[1]: 'proxy.local' is not an IP address or CIDR",
    ),
    ("trusted_proxies: 10.0.0.1\n", 1, "trusted_proxies: must be a list, not a string"),
    (
        "identity:\n  user_header: X User\n",
        2,
        "identity.user_header: 'X User' is not a valid HTTP header name",
    ),
    (
        "identity:\n  user_header: Authorization\n",
        2,
        "identity.user_header: 'Authorization' is set by the gateway itself",
    ),
    (
        "identity:\n  roles_header: x-service-user\n",
        2,
        "identity.roles_header: must differ from identity.user_header",
    ),
    (
        "identity:\n  token_id_header: X_Service_User\n",
        2,
        "identity.token_id_header: must differ from identity.user_header",
    ),
    ("cache:\n  ttl: -1\n", 2, "cache.ttl: must be a number ≥ 0"),
    ("cache:\n  max_entries: 0\n", 2, "cache.max_entries: must be a positive integer"),
    ("cache:\n  max_entries: 1.5\n", 2, "cache.max_entries: must be a positive integer, not a number"),
    ("cache:\n  outage_grace: .inf\n", 2, "cache.outage_grace: must be a number ≥ 0, not inf"),
    ("limits:\n  max_body: true\n", 2, "limits.max_body: must be a positive integer, not a boolean"),
    ("limits:\n  keepalive_timeout: 0\n", 2, "limits.keepalive_timeout: must be a positive number"),
    (
        "admin:\n  cors_origins: ['*']\n",
        2,
        "admin.cors_origins[0]: '*': wildcard origins are not allowed; list each origin",
    ),
    ("log_level: verbose\n", 1, "log_level: must be one of debug, info, warning, error"),
    ("routes: {name: x}\n", 1, "routes: must be a list, not a mapping"),
    ("routes:\n  - orders\n", 2, "routes[0]: must be a mapping with name, prefix and upstream"),
    ("routes:\n  - name: orders\n    prefix: /orders\n", 2, "routes[0].upstream: is required"),
    (ROUTE + "    tiemout: 3\n", 5, "routes[0].tiemout: unknown key; did you mean 'timeout'?"),
    (ROUTE + "    strip_prefix: yes\n", 5, "routes[0].strip_prefix: must be true or false, not 'yes'"),
    (ROUTE + "    preserve_host: off\n", 5, "routes[0].preserve_host: must be true or false, not 'off'"),
    (ROUTE + "    strip_prefix: 1\n", 5, "routes[0].strip_prefix: must be true or false, not 1"),
    (ROUTE + "    timeout: 0\n", 5, "routes[0].timeout: must be a positive number"),
    (ROUTE + "    timeout: '30'\n", 5, "routes[0].timeout: must be a positive number, not a string"),
    (ROUTE + "    timeout: 1:30\n", 5, "routes[0].timeout: must be a positive number, not a string"),
    (ROUTE + "    max_body: 0\n", 5, "routes[0].max_body: must be a positive integer"),
    (ROUTE + "    max_connections: -3\n", 5, "routes[0].max_connections: must be a positive integer"),
    (ROUTE + "    cors: null\n", 5, "routes[0].cors: must be a mapping (write `cors: {}` for the defaults)"),
    (
        ROUTE + "    cors:\n      origin: store\n",
        6,
        "routes[0].cors.origin: unknown key; did you mean 'origins'?",
    ),
    (
        ROUTE + "    cors:\n      origins: any\n",
        6,
        "routes[0].cors.origins: must be `store`, a list of origins, or {store: true|false, extra: [...]}",
    ),
    (
        ROUTE + "    cors:\n      origins:\n        - https://ok.example\n        - 'null'\n",
        8,
        "routes[0].cors.origins[1]: 'null' is not an allowed origin (sandboxed pages and local files "
        "all send it)",
    ),
    (
        ROUTE + "    cors:\n      origins: {store: yes}\n",
        6,
        "routes[0].cors.origins.store: must be true or false, not 'yes'",
    ),
    (
        ROUTE + "    cors:\n      allow_headers: [Authorization, 'Bad Header']\n",
        6,
        "routes[0].cors.allow_headers[1]: 'Bad Header' is not a valid HTTP header name",
    ),
    (ROUTE + "    cors:\n      max_age: -1\n", 6, "routes[0].cors.max_age: must be an integer ≥ 0"),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_config_error_at_file_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    assert f"{path}:{line}: {message}" in problems_of(path)


ROUTE_FIELD_ERRORS = [
    # (field, value, message)
    ("name", "Orders", "routes[0].name: must match ^[a-z0-9][a-z0-9._-]{0,62}$"),
    ("name", "-x", "routes[0].name: must match ^[a-z0-9][a-z0-9._-]{0,62}$"),
    ("prefix", "orders", "routes[0].prefix: must start with '/'"),
    (
        "prefix",
        "/orders/",
        "routes[0].prefix: must not end with '/' (the prefix '/orders' already matches '/orders/...')",
    ),
    ("prefix", "/a//b", "routes[0].prefix: must not contain '//'"),
    ("prefix", "/a/./b", "routes[0].prefix: must not contain '.' or '..' segments"),
    ("prefix", "/a/..", "routes[0].prefix: must not contain '.' or '..' segments"),
    (
        "prefix",
        "/a%2fb",
        "routes[0].prefix: must not contain '%' (prefixes match the decoded, canonical path)",
    ),
    (
        "prefix",
        "'/a?b'",
        "routes[0].prefix: must not contain '?' (prefixes match the decoded, canonical path)",
    ),
    (
        "prefix",
        "'/a#b'",
        "routes[0].prefix: must not contain '#' (prefixes match the decoded, canonical path)",
    ),
    ("prefix", "/a;b", "routes[0].prefix: must not contain ';' (prefixes match the decoded, canonical path)"),
    (
        "prefix",
        "'/a\\b'",
        "routes[0].prefix: must not contain '\\\\' (prefixes match the decoded, canonical path)",
    ),
    ("upstream", "ftp://h", "routes[0].upstream: must be an http(s) URL: http(s)://host[:port][/base-path]"),
    (
        "upstream",
        "127.0.0.1:9000",
        "routes[0].upstream: must be an http(s) URL: http(s)://host[:port][/base-path]",
    ),
    ("upstream", "http://", "routes[0].upstream: must be an http(s) URL: http(s)://host[:port][/base-path]"),
    (
        "upstream",
        "http://h:99999",
        "routes[0].upstream: must be an http(s) URL: http(s)://host[:port][/base-path]",
    ),
    ("upstream", "'http://h/?a=1'", "routes[0].upstream: must not contain a query or fragment"),
    ("upstream", "'http://h/#x'", "routes[0].upstream: must not contain a query or fragment"),
    ("upstream", "http://u:p@h", "routes[0].upstream: must not contain credentials (user:password@)"),
]


@pytest.mark.parametrize(("field", "value", "message"), ROUTE_FIELD_ERRORS)
def test_route_field_errors(tmp_path: Path, field: str, value: str, message: str) -> None:
    lines = {"name": 2, "prefix": 3, "upstream": 4}
    text = ROUTE.replace(
        {"name": "name: orders", "prefix": "prefix: /orders", "upstream": "upstream: http://127.0.0.1:9000"}[
            field
        ],
        f"{field}: {value}",
    )
    path = write(tmp_path, text)
    assert problems_of(path) == [f"{path}:{lines[field]}: {message}"]


def test_duplicate_route_names_and_prefixes(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE + "  - name: orders\n    prefix: /orders\n    upstream: http://h\n")
    assert problems_of(path) == [
        f"{path}:5: routes[1].name: route 'orders' is already defined at line 2",
        f"{path}:6: routes[1].prefix: '/orders' is already the prefix of route 'orders' (line 3)",
    ]


def test_yes_and_on_are_strings_not_booleans(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ROUTE.replace("name: orders", "name: on") + "  - name: yes\n    prefix: /y\n    upstream: http://h\n",
    )
    assert [route.name for route in load_config(path, env={}).routes] == ["on", "yes"]


def test_all_problems_are_reported_in_line_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        log_level: loud
        listeners:
          proxy: nowhere
        routes:
          - name: Bad
            prefix: bad
            upstream: gopher://h
            strip_prefix: no
        cache:
          ttl: -5
        """,
    )
    problems = problems_of(path, {"GATEWAY_ADMIN_LISTEN": "x"})
    lines = [int(p[len(str(path)) + 1 :].split(":")[0]) for p in problems if p.startswith(str(path))]
    assert lines == [1, 3, 5, 6, 7, 8, 10]
    assert any(p.startswith("GATEWAY_ADMIN_LISTEN: ") for p in problems)


def test_duplicate_key_in_config_is_reported_with_the_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, ROUTE + "    prefix: /again\n")
    assert problems_of("gateway.yaml") == ["gateway.yaml:5: duplicate key 'prefix' (first defined at line 3)"]


# --- parse_listen and normalize_origin --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("gw-1.internal:80", ("gw-1.internal", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:80", ("::", 80)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("8080", "must be HOST:PORT"),
        (":8080", "must be HOST:PORT"),
        ("host:", "port must be a number"),
        ("host:65536", "port must be a number"),
        ("host:-1", "port must be a number"),
        ("host:８０", "port must be a number"),
        ("::1:8080", "in brackets"),
        ("[zz]:80", "is not an IPv6 address"),
        ("bad host:80", "is not a host name"),
        ("https://127.0.0.1:8443", 'without a scheme ("127.0.0.1:8443")'),
        ("tcp://[::1]:80/", 'without a scheme ("[::1]:80")'),
    ],
)
def test_parse_listen_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com/", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80/", "http://app.example.com"),
        ("http://app.example.com:443", "http://app.example.com:443"),
        ("https://app.example.com:8443", "https://app.example.com:8443"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://[0:0::1]", "http://[::1]"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
    ],
)
def test_normalize_origin(text: str, expected: str) -> None:
    assert normalize_origin(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("null", "'null' is not an allowed origin"),
        ("*", "wildcard"),
        ("https://*.example.com", "wildcard"),
        ("ftp://app.example.com", "http:// or https://"),
        ("app.example.com", "http:// or https://"),
        ("https://", "is not an origin"),
        ("https://app.example.com/path", "no path, query or fragment"),
        ("https://app.example.com?x=1", "no path, query or fragment"),
        ("https://app.example.com#top", "no path, query or fragment"),
        ("https://user:pw@app.example.com", "user names or passwords"),
        ("https://app.example.com:99999", "is not an origin"),
        ("https://app.example.com:0", "port 0"),
        ("https://bad_host!.example", "not a valid host name"),
        ("https://app.example.com ", "is not an origin"),
    ],
)
def test_normalize_origin_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_origin(text)
    assert fragment in str(info.value)


# --- shipped configuration --------------------------------------------------------------------


def test_shipped_config_loads() -> None:
    config = load_config(REPO / "gateway.yaml", env={})
    assert config.proxy_listen == ("127.0.0.1", 8080)
    assert config.admin_listen == ("127.0.0.1", 8081)
    assert config.store_url == f"sqlite+aiosqlite:///{REPO}/gateway.db"
    assert config.policies_path == REPO / "policies"
    assert [(r.name, r.prefix, r.upstream, r.strip_prefix) for r in config.routes] == [
        ("echo", "/echo", "http://127.0.0.1:9000", False),
        ("orders", "/orders", "http://127.0.0.1:9000", False),
        ("browser", "/browser", "http://127.0.0.1:9000", True),
    ]
    assert config.routes[2].cors == CorsConfig(
        store=True,
        extra=(),
        allow_headers=("Authorization", "Content-Type"),
        expose_headers=("X-Request-Id",),
        max_age=600,
    )


def test_store_password_stays_out_of_the_config_repr() -> None:
    from pathlib import Path

    from gateway.config import load_config

    shipped = Path(__file__).resolve().parent.parent.parent / "gateway.yaml"
    config = load_config(shipped, env={"GATEWAY_STORE_URL": "postgresql+asyncpg://u:hunter2@db.example/gw"})
    assert config.store_url.endswith("u:hunter2@db.example/gw")
    assert "hunter2" not in repr(config)
