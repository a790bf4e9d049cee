"""The command line in remote mode (CONTRACT "Command line, second wave"): the same commands
through a running gateway's admin API, with the same output as local mode; `--format json`
on every command; the admin token never sent in clear or to a redirect.

Real parts: `gateway serve` as a process on a SQLite file, the CLI as subprocesses, and a
second store worked on locally for the comparison.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import write_config
from tests.process import REPO, GatewayProcess

VOLATILE = re.compile(
    r'"(id|created_at|assigned_at|at|expires_at|last_used_at|token|secret|token_id|kid|signs_from)": '
    r'("[^"]*"|[0-9]+)'  # an audit event's id is a number
)


def run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` with only the GATEWAY_* variables given."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def admin_token(config: Path) -> str:
    """Create the admin identity `root` locally and return its token."""
    made = run("user", "create", "root", "--admin", cwd=config.parent, env={})
    assert made.returncode == 0, made.stderr
    issued = run("token", "set", "adm", "--user", "root", "--format", "json", cwd=config.parent, env={})
    assert issued.returncode == 0, issued.stderr
    return str(json.loads(issued.stdout)["token"])


@pytest.fixture
async def remote(
    tmp_path: Path, upstream: TestServer
) -> AsyncIterator[tuple[GatewayProcess, dict[str, str]]]:
    """A running gateway (its own store) and the environment that points the CLI at it."""
    served = tmp_path / "served"
    served.mkdir()
    config = write_config(
        served, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=str(upstream.make_url(""))
    )
    token = await asyncio.to_thread(admin_token, config)
    process = GatewayProcess(config)
    try:
        await process.wait_ready()
        yield process, {"GATEWAY_ADMIN_URL": process.admin, "GATEWAY_ADMIN_TOKEN": token}
    finally:
        process.stop()


LIFECYCLE: list[list[str]] = [
    [
        "user",
        "create",
        "backend",
        "--roles",
        "reader",
        "--description",
        "order sync",
        "--origins",
        "https://app.example",
    ],
    ["user", "get", "backend"],
    ["user", "update", "backend", "--add-roles", "writer", "--remove-origins", "https://app.example"],
    ["user", "update", "backend", "--rate-limit", "100/1s:200", "--description", ""],
    ["token", "set", "ci", "--user", "backend", "--expires-at", "2099-01-01", "--description", "ci job"],
    ["token", "set", "fixed", "--user", "backend", "--roles", "reader"],
    ["token", "list", "--user", "backend"],
    ["token", "reset", "ci", "--user", "backend"],
    ["token", "expire", "ci", "--user", "backend"],
    ["token", "delete", "fixed", "--user", "backend"],
    ["audit", "list", "--user", "backend", "--limit", "5"],
    ["key", "create", "--user", "backend", "--description", "exchange"],
    ["key", "list", "--user", "backend"],
    ["user", "update", "backend", "--disable"],
    ["user", "list", "--id-prefix", "back"],
    ["authz", "explain", "GET", "http://gateway/echo/a", "--user", "backend"],
    ["user", "delete", "backend"],
    ["user", "get", "backend"],
]


def masked(text: str) -> str:
    """JSON output with ids, times and secrets replaced (they differ between two stores)."""
    return VOLATILE.sub(lambda m: f'"{m[1]}": "…"', text)


async def test_the_lifecycle_prints_the_same_json_locally_and_remotely(
    tmp_path: Path, remote: tuple[GatewayProcess, dict[str, str]], upstream: TestServer
) -> None:
    process, env = remote
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local = write_config(
        local_dir, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=str(upstream.make_url(""))
    )
    elsewhere = tmp_path / "laptop"  # no gateway.yaml here: remote mode needs none
    elsewhere.mkdir()
    for command in LIFECYCLE:
        here = await asyncio.to_thread(run, *command, "--format", "json", cwd=local.parent, env={})
        there = await asyncio.to_thread(run, *command, "--format", "json", cwd=elsewhere, env=env)
        assert (there.returncode, here.returncode) == (here.returncode, here.returncode), (
            command,
            here,
            there,
        )
        # The actor differs by design: the CLI's OS user locally, the admin through the API.
        local_text = masked(here.stdout).replace(
            json.dumps(f"cli:{os.environ.get('USER', 'root')}"), '"ACTOR"'
        )
        remote_text = masked(there.stdout).replace('"root"', '"ACTOR"')
        local_text = re.sub(r'"cli:[^"]*"', '"ACTOR"', local_text)
        assert json.loads(remote_text or "null") == json.loads(local_text or "null"), command
        assert there.stderr.strip() == here.stderr.strip(), command
    # The audit trail on the served store names the admin.
    events = await asyncio.to_thread(run, "audit", "list", "--format", "json", cwd=elsewhere, env=env)
    actors = {
        event["actor"]
        for event in json.loads(events.stdout)["items"]
        if event["target"].startswith(("user/backend", "token/backend"))
    }
    assert actors == {"root"}


async def test_text_output_is_the_same_too(
    tmp_path: Path, remote: tuple[GatewayProcess, dict[str, str]], upstream: TestServer
) -> None:
    _, env = remote
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local = write_config(
        local_dir, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=str(upstream.make_url(""))
    )
    for command in (
        ["user", "create", "svc", "--roles", "reader"],
        ["user", "update", "svc", "--add-roles", "writer"],
        ["token", "expire", "nope", "--user", "svc"],
        ["user", "get", "missing"],
        ["user", "create", "svc"],
    ):
        here = await asyncio.to_thread(run, *command, cwd=local.parent, env={})
        there = await asyncio.to_thread(run, *command, cwd=tmp_path, env=env)
        assert (unify(there.stdout), there.returncode) == (unify(here.stdout), here.returncode), command
        assert unify(there.stderr) == unify(here.stderr), command


async def test_lists_page_through_everything(
    tmp_path: Path, remote: tuple[GatewayProcess, dict[str, str]]
) -> None:
    process, env = remote
    # More users than one page of the client (1,000), written straight into the served store.
    import sqlite3

    from gateway.timeparse import format_time, utcnow

    database = sqlite3.connect(process.config.parent / "gateway.db")
    with database:
        database.executemany(
            "INSERT INTO service_users (name, kind, disabled, created_at, created_by) "
            "VALUES (?, 'service', 0, ?, 'test')",
            [
                (f"bulk{index:04d}", format_time(utcnow()).replace("T", " ").rstrip("Z"))
                for index in range(1005)
            ],
        )
    database.close()
    listed = await asyncio.to_thread(run, "user", "list", "--format", "json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    names = [user["name"] for user in json.loads(listed.stdout)["items"]]
    assert len(names) == 1006 and len(set(names)) == 1006  # with root
    audit = await asyncio.to_thread(
        run, "audit", "list", "--limit", "2", "--format", "json", cwd=tmp_path, env=env
    )
    assert len(json.loads(audit.stdout)["items"]) == 2


async def test_the_token_never_goes_in_clear_or_to_a_redirect(
    tmp_path: Path, remote: tuple[GatewayProcess, dict[str, str]]
) -> None:
    _, env = remote
    token = env["GATEWAY_ADMIN_TOKEN"]
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        if request.path.startswith("/v1"):
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere")
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    redirecting = TestServer(app, host="127.0.0.1")
    await redirecting.start_server()
    try:
        moved = await asyncio.to_thread(
            run, "user", "list", cwd=tmp_path, env={**env, "GATEWAY_ADMIN_URL": str(redirecting.make_url(""))}
        )
    finally:
        await redirecting.close()
    assert moved.returncode == 1 and "redirect" in moved.stderr and "not followed" in moved.stderr
    assert len(seen) == 1  # the redirect target was never asked

    # Not loopback, yet on this machine (a broken check must not send traffic elsewhere).
    for url in ("http://0.0.0.0:1", "ftp://127.0.0.1", "http://[::]:1"):
        refused = await asyncio.to_thread(
            run, "user", "list", cwd=tmp_path, env={**env, "GATEWAY_ADMIN_URL": url}
        )
        assert refused.returncode == 1 and "--admin-url" in refused.stderr, refused.stderr
        assert token not in refused.stdout + refused.stderr

    no_token = await asyncio.to_thread(
        run, "user", "list", cwd=tmp_path, env={"GATEWAY_ADMIN_URL": env["GATEWAY_ADMIN_URL"]}
    )
    assert no_token.returncode == 1 and "GATEWAY_ADMIN_TOKEN" in no_token.stderr
    wrong = await asyncio.to_thread(
        run, "user", "list", cwd=tmp_path, env={**env, "GATEWAY_ADMIN_TOKEN": "gw_wrong"}
    )
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: ")
    # The token file and option spelling work, after the subcommand too.
    token_file = tmp_path / "admin.token"
    token_file.write_text(token + "\n")
    from_file = await asyncio.to_thread(
        run,
        "user",
        "list",
        "--admin-url",
        env["GATEWAY_ADMIN_URL"],
        "--admin-token-file",
        str(token_file),
        cwd=tmp_path,
        env={},
    )
    assert from_file.returncode == 0 and "root" in from_file.stdout, from_file.stderr


def unify(text: str) -> str:
    """Output with the actor (OS user or admin) and times made alike."""
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "T", re.sub(r"cli:\S+|\broot\b", "ACTOR", text))


def test_json_everywhere_locally(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url="http://127.0.0.1:9"
    )

    def json_of(*args: str) -> Any:
        done = run(*args, "--format", "json", cwd=config.parent, env={})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert json_of("check")["ok"] is True
    assert json_of("user", "create", "svc", "--roles", "reader")["name"] == "svc"
    issued = json_of("token", "set", "t", "--user", "svc")
    assert issued["token"].startswith("gw_") and issued["name"] == "t"
    reset = json_of("token", "reset", "t", "--user", "svc")
    assert reset["token"] != issued["token"] and reset["id"] == issued["id"]
    assert json_of("token", "expire", "t", "--user", "svc")["expired"] is True
    key = json_of("key", "create", "--user", "svc")
    assert key["secret"].startswith("gwk_")
    assert json_of("key", "expire", key["id"])["expired"] is True
    assert json_of("key", "delete", key["id"]) == {"deleted": True, "id": key["id"], "user": "svc"}
    assert json_of("token", "delete", "t", "--user", "svc") == {"deleted": True, "user": "svc", "name": "t"}
    assert json_of("user", "update", "svc", "--disable")["disabled"] is True
    assert json_of("user", "delete", "svc") == {"deleted": True, "name": "svc"}
    about = json_of("audit", "list", "--user", "svc")["items"]
    assert about and all(
        e["target"] == "user/svc" or e["target"].startswith(("token/svc/", "key/svc/")) for e in about
    )


async def test_an_https_admin_url_is_verified_and_admin_ca_file_trusts_a_private_ca(
    tmp_path: Path, upstream: TestServer
) -> None:
    from tests.security.test_listener_tls import gateway_config, install, issue, tls_block, wait_ready_https

    served = tmp_path / "served"
    served.mkdir()
    config = gateway_config(served, upstream, admin=tls_block())
    install(served, issue())
    token = await asyncio.to_thread(admin_token, config)
    process = GatewayProcess(config)
    try:
        await wait_ready_https(process)
        env = {"GATEWAY_ADMIN_URL": f"https://127.0.0.1:{process.admin_port}", "GATEWAY_ADMIN_TOKEN": token}
        untrusted = await asyncio.to_thread(run, "user", "list", cwd=tmp_path, env=env)
        assert untrusted.returncode == 1 and "not trusted" in untrusted.stderr, untrusted.stderr
        assert token not in untrusted.stderr
        ca_file = str(served / "tls" / "ca.pem")
        trusted = await asyncio.to_thread(
            run, "user", "list", "--admin-ca-file", ca_file, cwd=tmp_path, env=env
        )
        assert trusted.returncode == 0 and "root" in trusted.stdout, trusted.stderr
    finally:
        process.stop()
