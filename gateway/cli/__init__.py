"""The command line (README "Command line"): ``gateway [--config PATH] COMMAND ...``.

Imports: cli.commands (and through it config, policy, store, services; app lazily).

Every user/token/audit command opens the store named by the config (migrating it if
needed, exactly like ``gateway serve``) and goes through the same service layer as
the admin API, so the two cannot drift apart; running gateways see the changes
through the store's change feed. Tables are for people, ``--format json`` prints
the admin API's objects (lists as ``{"items": [...]}``). Errors: ``error: <message>``
on stderr and exit 1; usage errors exit 2. A token secret is printed exactly once,
on its own ``Access token:`` line.

Layout: ``commands`` (click commands), ``session`` (config, store, actor, errors),
``output`` (tables, JSON).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from gateway.cli.commands import DEFAULT_CONFIG, cli
from gateway.cli.session import Session

__all__ = ["UsageProblem", "cli", "main", "split_config_option", "split_global_options"]


class UsageProblem(Exception):
    """A malformed --config option, found before click parses anything."""


# Options of the whole command line that may also follow the subcommand.
GLOBAL_OPTIONS = ("--config", "--admin-url", "--admin-token-file", "--admin-ca-file")


def split_global_options(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Take the GLOBAL_OPTIONS (``--opt VALUE`` / ``--opt=VALUE``) out of `argv` wherever they
    are: ({option: value}, rest).

    Lets them follow the subcommand (``gateway user list --config x.yaml``), which click's
    group options cannot do. Scanning stops at ``--``; the last one wins.
    """
    found: dict[str, str] = {}
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--":
            rest.append(item)
            rest.extend(items)
            break
        name, equals, value = item.partition("=")
        if name not in GLOBAL_OPTIONS:
            rest.append(item)
            continue
        if not equals:
            value = next(items, "")
            if value.startswith("-"):
                value = ""
        if not value:
            raise UsageProblem(f"option '{name}' requires a value")
        found[name] = value
    return found, rest


def split_config_option(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`split_global_options` for --config alone (the others stay in the rest)."""
    found, rest = split_global_options(argv)
    others = [part for name, value in found.items() if name != "--config" for part in (name, value)]
    return found.get("--config"), others + rest


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``gateway = "gateway.cli:main"``); exits with the command's status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        found, rest = split_global_options(args)
    except UsageProblem as exc:
        click.echo("Usage: gateway [--config PATH] COMMAND [ARGS]...", err=True)
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    chosen = found.get("--config") or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG
    session = Session(
        Path(chosen),
        admin_url=found.get("--admin-url"),
        admin_token_file=found.get("--admin-token-file"),
        admin_ca_file=found.get("--admin-ca-file"),
    )
    cli.main(args=rest, prog_name="gateway", obj=session)
