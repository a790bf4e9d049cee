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

__all__ = ["UsageProblem", "cli", "main", "split_config_option"]


class UsageProblem(Exception):
    """A malformed --config option, found before click parses anything."""


def split_config_option(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take ``--config PATH`` / ``--config=PATH`` out of `argv` wherever it is: (path, rest).

    Lets ``--config`` follow the subcommand (``gateway user list --config x.yaml``),
    which click's group options cannot do. Scanning stops at ``--``; the last one wins.
    """
    path: str | None = None
    rest: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--":
            rest.append(item)
            rest.extend(items)
            break
        if item == "--config":
            path = next(items, None)
            if path is None or path.startswith("-"):
                raise UsageProblem("option '--config' requires a path")
        elif item.startswith("--config="):
            path = item.removeprefix("--config=")
            if not path:
                raise UsageProblem("option '--config' requires a path")
        else:
            rest.append(item)
    return path, rest


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``gateway = "gateway.cli:main"``); exits with the command's status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        path, rest = split_config_option(args)
    except UsageProblem as exc:
        click.echo("Usage: gateway [--config PATH] COMMAND [ARGS]...", err=True)
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    chosen = path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG
    cli.main(args=rest, prog_name="gateway", obj=Session(Path(chosen)))
