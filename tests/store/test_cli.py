"""The command line, run as a real subprocess (`python -m gateway`) on a config in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Protocol

import pytest

from gateway import tokens
from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
POLICIES = """
roles:
  service-user-project-admin: {permissions: ["*"]}
  reader: {permissions: ["echo:read"]}
  writer: {permissions: ["echo:write"]}
routes:
  echo:
    rules:
      - {methods: [GET], paths: ["/echo/**"], require: "echo:read"}
      - {methods: [POST], paths: ["/echo/**"], require: "echo:write"}
"""


def write_config(directory: Path, store_url: str = "sqlite+aiosqlite:///gw.db") -> Path:
    """A minimal gateway.yaml + policies/ in `directory`; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "roles.yaml").write_text(textwrap.dedent(POLICIES))
    config = directory / "gateway.yaml"
    config.write_text(
        f'store: {{url: "{store_url}"}}\n'
        'routes: [{name: echo, prefix: /echo, upstream: "http://127.0.0.1:9000"}]\n'
    )
    return config


def gateway(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway ARGS` and capture its output."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Run(Protocol):
    """Runs one gateway command and checks its exit status."""

    def __call__(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with a SQLite store next to it."""
    return write_config(tmp_path / "conf")


@pytest.fixture
def cli(config: Path, tmp_path: Path) -> Run:
    """Run a command as a subprocess, `--config` after the subcommand, from an unrelated directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = gateway(*args, "--config", str(config), cwd=elsewhere)
        assert done.returncode == expect, (done.stdout, done.stderr)
        return done

    return run


@pytest.fixture
def gw(config: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """The same entry point, `main(argv)`, called in this process (fast, for error matrices)."""
    return in_process(config, capsys)


def in_process(config: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """A runner of `main(argv)` in this process on `config`, asserting the exit code."""

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        with pytest.raises(SystemExit) as exited:
            main([*args, "--config", str(config)])
        captured = capsys.readouterr()
        assert exited.value.code == expect, (args, captured.out, captured.err)
        return subprocess.CompletedProcess(args, expect, captured.out, captured.err)

    return run


def access_token(stdout: str) -> str:
    """The secret from the one "Access token:" line."""
    [line] = [line for line in stdout.splitlines() if line.startswith("Access token: ")]
    secret = line.removeprefix("Access token: ")
    assert tokens.is_well_formed(secret)
    return secret


def test_user_and_token_lifecycle(store_url: str, tmp_path: Path) -> None:
    """The whole flow on each store (SQLite and PostgreSQL), --config before the command."""
    config = write_config(tmp_path / "conf", store_url)

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = gateway("--config", str(config), *args, cwd=tmp_path)
        assert done.returncode == expect, (done.stdout, done.stderr)
        return done

    created = run("user", "create", "backend-operator", "--roles", "reader,writer", "--description", "Ops")
    assert "User created: backend-operator" in created.stdout
    assert "Roles assigned: reader, writer" in created.stdout
    token = run(
        "token",
        "set",
        "backend-token",
        "--user",
        "backend-operator",
        "--expires-at",
        "2099-01-01",
        "--description",
        "Backend Operator Token",
        "--roles",
        "reader",
    )
    lines = token.stdout.splitlines()
    assert lines[0] == "Note: Save the token in a secure location as it will not be shown again"
    secret = access_token(token.stdout)
    assert "Created for user: backend-operator" in lines and "Roles: reader" in lines
    listed = json.loads(run("token", "list", "--user", "backend-operator", "--format", "json").stdout)
    [item] = listed["items"]
    assert item["name"] == "backend-token" and item["roles"] == ["reader"]
    assert item["expires_at"] == "2099-01-01T00:00:00Z" and item["expired"] is False
    run("user", "update", "backend-operator", "--remove-roles", "reader", "--disable")
    user = json.loads(run("user", "get", "backend-operator", "--format", "json").stdout)
    assert [r["name"] for r in user["roles"]] == ["writer"] and user["disabled"] is True
    reset = run("token", "reset", "backend-token", "--user", "backend-operator")
    new_secret = access_token(reset.stdout)
    assert new_secret != secret and f"(id {item['id']})" in reset.stdout
    run("token", "expire", "backend-token", "--user", "backend-operator")
    listed = json.loads(run("token", "list", "--user", "backend-operator", "--format", "json").stdout)
    [after] = listed["items"]
    assert after["id"] == item["id"] and after["roles"] == [] and after["expired"] is True
    run("token", "delete", "backend-token", "--user", "backend-operator")
    run("user", "delete", "backend-operator")
    gone = run("user", "get", "backend-operator", expect=1)
    assert gone.stderr.strip() == "error: user 'backend-operator' not found"
    events = json.loads(run("audit", "list", "--format", "json").stdout)["items"]
    assert [e["action"] for e in events] == [
        "user.deleted",
        "token.deleted",
        "token.expired",
        "token.reset",
        "user.updated",
        "token.created",
        "user.created",
    ]
    assert all(e["actor"].startswith("cli:") for e in events)
    everything = json.dumps(events) + run("audit", "list").stdout
    assert secret not in everything and new_secret not in everything


def test_user_commands_tables_and_json(gw: Run) -> None:
    gw(
        "user",
        "create",
        "backend-b",
        "--roles",
        "reader",
        "--origins",
        "https://App.example.com,http://localhost:3000",
    )
    gw("user", "create", "backend-a")
    gw("user", "create", "monitor", "--roles", "reader,writer")
    gw("user", "create", "root", "--admin")
    table = gw("user", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "KIND", "ROLES"]
    assert [line.split()[0] for line in table[1:]] == ["backend-a", "backend-b", "monitor", "root"]
    data = json.loads(gw("user", "list", "--format", "json").stdout)
    assert [u["name"] for u in data["items"]] == ["backend-a", "backend-b", "monitor", "root"]
    by_name = {u["name"]: u for u in data["items"]}
    assert by_name["backend-a"]["roles"][0]["name"] == "service-user-project-admin"
    assert by_name["backend-b"]["allowed_origins"] == ["http://localhost:3000", "https://app.example.com"]
    assert by_name["root"]["kind"] == "admin" and by_name["root"]["roles"] == []
    assert set(by_name["monitor"]) == {
        "name",
        "kind",
        "href",
        "description",
        "roles",
        "allowed_origins",
        "disabled",
        "rate_limit",
        "created_at",
        "created_by",
    }
    prefixed = json.loads(gw("user", "list", "--id-prefix", "backend-", "--format", "json").stdout)
    assert [u["name"] for u in prefixed["items"]] == ["backend-a", "backend-b"]
    readers = json.loads(gw("user", "list", "--roles", "reader", "--format", "json").stdout)
    assert [u["name"] for u in readers["items"]] == ["backend-b", "monitor"]
    details = gw("user", "get", "monitor").stdout
    assert "Name:" in details and "- reader (assigned by cli:" in details
    updated = gw(
        "user",
        "update",
        "backend-b",
        "--add-roles",
        "writer",
        "--remove-origins",
        "http://localhost:3000",
        "--description",
        "new text",
    )
    assert "User updated: backend-b" in updated.stdout
    got = json.loads(gw("user", "get", "backend-b", "--format", "json").stdout)
    assert [r["name"] for r in got["roles"]] == ["reader", "writer"]
    assert got["allowed_origins"] == ["https://app.example.com"] and got["description"] == "new text"
    gw("user", "update", "backend-b", "--enable", "--description", "")
    assert json.loads(gw("user", "get", "backend-b", "--format", "json").stdout)["description"] is None
    assert "User deleted: backend-b" in gw("user", "delete", "backend-b").stdout


def test_token_secret_is_shown_once_and_never_stored(cli: Run, config: Path) -> None:
    cli("user", "create", "svc", "--roles", "reader,writer")
    done = cli("token", "set", "ci", "--user", "svc")
    secret = access_token(done.stdout)
    assert done.stdout.count(secret) == 1 and secret not in done.stderr
    assert "Roles: reader, writer" in done.stdout
    outputs = [
        cli("token", "list", "--user", "svc").stdout,
        cli("token", "list", "--user", "svc", "--format", "json").stdout,
        cli("audit", "list", "--format", "json").stdout,
        cli("user", "get", "svc", "--format", "json").stdout,
    ]
    for output in outputs:
        assert secret not in output and secret[3:46] not in output
    [item] = json.loads(outputs[1])["items"]
    assert set(item) == {
        "id",
        "name",
        "user",
        "description",
        "roles",
        "expires_at",
        "expired",
        "created_at",
        "created_by",
        "last_used_at",
    }
    assert item["roles"] is None and item["last_used_at"] is None
    stored = b"".join(p.read_bytes() for p in config.parent.glob("gw.db*"))
    assert stored and secret.encode() not in stored and secret[3:46].encode() not in stored
    assert tokens.digest(secret).encode() in stored


def test_expiry_is_always_printed_never_when_absent(gw: Run) -> None:
    """`token set` and `key create` always print an "Expires at" line, `never` without --expires-at;
    the tables say `never` too (issue 15: a missing line read as a dropped value)."""
    gw("user", "create", "svc", "--roles", "reader")
    lasting = gw("token", "set", "lasting", "--user", "svc").stdout.splitlines()
    secret = access_token("\n".join(lasting))
    assert lasting == [
        "Note: Save the token in a secure location as it will not be shown again",
        f"Access token: {secret}",
        "Created for user: svc",
        "Roles: reader (follows the user's roles)",
        "Expires at: never",
    ]
    dated = gw("token", "set", "dated", "--user", "svc", "--expires-at", "2099-01-01").stdout.splitlines()
    assert dated[2:] == [
        "Created for user: svc",
        "Roles: reader (follows the user's roles)",
        "Expires at: 2099-01-01T00:00:00Z",
    ]
    assert expires_column(gw("token", "list", "--user", "svc").stdout) == {
        "dated": "2099-01-01T00:00:00Z",
        "lasting": "never",
    }
    # JSON keeps the admin API's null.
    items = json.loads(gw("token", "list", "--user", "svc", "--format", "json").stdout)["items"]
    assert {item["name"]: item["expires_at"] for item in items}["lasting"] is None

    key = gw("key", "create", "--user", "svc").stdout.splitlines()
    assert key[-2:] == ["Created for user: svc", "Expires at: never"]
    assert list(expires_column(gw("key", "list", "--user", "svc").stdout).values()) == ["never"]


def expires_column(table: str) -> dict[str, str]:
    """First cell → EXPIRES AT cell of a CLI table (cells may hold spaces: "(user's roles)")."""
    header, *rows = table.splitlines()
    start = header.index("EXPIRES AT")
    return {row.split()[0]: row[start:].split()[0] for row in rows}


def test_errors_exit_1_with_messages(gw: Run) -> None:
    gw("user", "create", "svc", "--roles", "reader")
    cases = [
        (("user", "get", "ghost"), "error: user 'ghost' not found"),
        (("user", "create", "svc"), "error: user 'svc' already exists"),
        (("user", "create", "x", "--roles", "nope"), "error: role 'nope' is not defined in policies/"),
        (("user", "create", "Bad Name"), "error: invalid name"),
        (("user", "create", "adm", "--admin", "--roles", "reader"), "error: admin identities hold no roles"),
        (("user", "create", "y", "--origins", "ftp://x.example"), "error: "),
        (("token", "set", "t", "--user", "ghost"), "error: user 'ghost' not found"),
        (
            ("token", "set", "t", "--user", "svc", "--roles", "writer"),
            "error: role 'writer' is not held by user 'svc'",
        ),
        (
            ("token", "set", "t", "--user", "svc", "--roles", "reader,ghost"),
            "error: role 'ghost' is not defined in policies/",
        ),
        (("token", "set", "t", "--user", "svc", "--expires-at", "2000-01-01"), "error: expires_at"),
        (("token", "reset", "nope", "--user", "svc"), "error: token 'nope' not found for user 'svc'"),
        (("token", "expire", "nope", "--user", "svc"), "error: token 'nope' not found for user 'svc'"),
        (("token", "delete", "nope", "--user", "svc"), "error: token 'nope' not found for user 'svc'"),
    ]
    for args, message in cases:
        done = gw(*args, expect=1)
        assert done.stderr.startswith(message), (args, done.stderr)
        assert "Traceback" not in done.stderr
    gw("token", "set", "t", "--user", "svc")
    duplicate = gw("token", "set", "t", "--user", "svc", expect=1)
    assert duplicate.stderr.startswith("error: token 't' already exists for user 'svc'")
    assert "Access token" not in duplicate.stdout


def test_token_roles_may_name_roles_reached_through_includes(gw: Run, config: Path) -> None:
    """`token set --roles` takes any role the user holds or reaches; removals keep what it still reaches."""
    included = textwrap.dedent(POLICIES).replace("writer: {", "writer: {includes: [reader], ")
    (config.parent / "policies" / "roles.yaml").write_text(included)
    gw("user", "create", "svc", "--roles", "writer")
    done = gw("token", "set", "ro", "--user", "svc", "--roles", "reader")
    assert "Roles: reader" in done.stdout.splitlines()
    admin_role = "service-user-project-admin"
    refused = gw("token", "set", "x", "--user", "svc", "--roles", f"reader,{admin_role}", expect=1)
    assert refused.stderr == f"error: role '{admin_role}' is not held by user 'svc'\n"

    def token_roles() -> list[str] | None:
        [item] = json.loads(gw("token", "list", "--user", "svc", "--format", "json").stdout)["items"]
        roles: list[str] | None = item["roles"]
        return roles

    gw("user", "update", "svc", "--add-roles", "reader")
    gw("user", "update", "svc", "--remove-roles", "writer")
    assert token_roles() == ["reader"]  # held directly now
    gw("user", "update", "svc", "--add-roles", "writer")
    gw("user", "update", "svc", "--remove-roles", "reader")
    assert token_roles() == ["reader"]  # reached through writer
    gw("user", "update", "svc", "--remove-roles", "writer")
    assert token_roles() == []


def test_usage_errors_exit_2(gw: Run, tmp_path: Path) -> None:
    for args in [
        ("user", "frobnicate"),
        ("user", "create"),
        ("user", "list", "--format", "yaml"),
        ("token", "set", "t"),  # --user is required
        ("token", "set", "t", "--user", "svc", "--expires-at", "next tuesday"),
        ("audit", "list", "--limit", "0"),
        ("user", "update", "svc", "--disable", "--bogus"),
        ("serve", "--workers", "0"),
    ]:
        done = gw(*args, expect=2)
        assert "Traceback" not in done.stderr
    for argv in (["user", "list", "--config"], ["user", "list", "--config="]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    # And from a real process: the exit status the shell sees.
    assert gateway("user", "list", "--config", cwd=tmp_path).returncode == 2


def test_config_option_forms_env_and_default(config: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert gateway("user", "create", "a", f"--config={config}", cwd=elsewhere).returncode == 0
    assert gateway("user", "list", "--config", str(config), "--format", "json", cwd=elsewhere).returncode == 0
    by_env = gateway("user", "list", "--format", "json", cwd=elsewhere, env={"GATEWAY_CONFIG": str(config)})
    assert [u["name"] for u in json.loads(by_env.stdout)["items"]] == ["a"]
    # Default: ./gateway.yaml; the SQLite path is relative to the config file, not the cwd.
    by_default = gateway("user", "list", "--format", "json", cwd=config.parent)
    assert [u["name"] for u in json.loads(by_default.stdout)["items"]] == ["a"]
    missing = gateway("user", "list", cwd=elsewhere)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")
    assert not (elsewhere / "gw.db").exists()


def test_check(config: Path, tmp_path: Path) -> None:
    done = gateway("check", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok: 1 routes, 3 roles"
    (config.parent / "policies" / "roles.yaml").write_text(
        'roles:\n  reader:\n    includes: [ghost]\n    permissions: ["echo:read"]\n'
    )
    broken = gateway("check", "--config", str(config), cwd=tmp_path)
    assert broken.returncode == 1 and broken.stdout == ""
    lines = broken.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines)
    assert "roles.yaml:" in broken.stderr
    # Commands that grant no role still work with broken policies; granting one reports them.
    assert gateway("user", "list", "--config", str(config), cwd=tmp_path).returncode == 0
    grant = gateway("user", "create", "x", "--roles", "reader", "--config", str(config), cwd=tmp_path)
    assert grant.returncode == 1 and "roles.yaml:" in grant.stderr


def test_check_warns_about_unknown_gateway_variables(config: Path, tmp_path: Path) -> None:
    """Issue 15: GATEWAY_LOG_LEVEL and a misspelt GATEWAY_STORE_URI were silently ignored."""
    env = {
        "GATEWAY_LOG_LEVEL": "debug",
        "GATEWAY_STORE_URI": "postgresql+asyncpg://u:hunter2@db.example/gw",
        # What Kubernetes injects for a Service named gateway: not a typo, no warning.
        "GATEWAY_SERVICE_HOST": "10.96.0.10",
        "GATEWAY_PORT_8080_TCP": "tcp://10.96.0.10:8080",
        "GATEWAY_TEST_PG": "postgresql://postgres@127.0.0.1:5432/test",
    }
    done = gateway("check", "--config", str(config), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok: 1 routes, 3 roles\n"
    unknown = "unknown environment variable (ignored)"
    assert done.stderr.splitlines() == [
        f"warning: GATEWAY_LOG_LEVEL: {unknown}; log_level is set in gateway.yaml",
        f"warning: GATEWAY_STORE_URI: {unknown}; did you mean GATEWAY_STORE_URL?",
    ]
    # A config that does not load has no warnings to carry, yet the misspelt variable may be
    # why: they come before the error.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    failed = gateway("check", cwd=elsewhere, env={"GATEWAY_CONFIG_FILE": str(config)})
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        f"warning: GATEWAY_CONFIG_FILE: {unknown}; did you mean GATEWAY_CONFIG?",
        "error: gateway.yaml: file not found",
    ]


def test_concurrent_first_commands_migrate_once(config: Path, tmp_path: Path) -> None:
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "user", "create", f"u{i}"],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [(p.wait(timeout=120), p.communicate()) for p in processes]
    assert all(code == 0 for code, _ in results), results
    listed = gateway("user", "list", "--format", "json", "--config", str(config), cwd=tmp_path)
    assert [u["name"] for u in json.loads(listed.stdout)["items"]] == ["u0", "u1", "u2", "u3"]


def test_help_lists_the_commands(tmp_path: Path) -> None:
    done = gateway("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("serve", "check", "user", "token", "audit", "--config"):
        assert command in done.stdout
