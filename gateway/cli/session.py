"""What every command shares: the config (loaded once), the store session, the actor, errors.

Imports: config, policy (lazily), store, services, errors.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.config import Config, environment_warnings, load_config
from gateway.errors import ConfigError, GatewayError, StoreUnavailable
from gateway.services import Directory, RoleGraph
from gateway.store import Store, open_store

T = TypeVar("T")


def actor() -> str:
    """`cli:<os user>`, the actor of the audit events this command line writes."""
    try:
        name = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (containers)
        name = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{name}"


def fail(exc: GatewayError, hint: str | None = None) -> NoReturn:
    """Print `exc` as ``error: …`` lines on stderr (one per config problem) and exit 1."""
    lines = exc.problems if isinstance(exc, ConfigError) else [exc.message]
    suffix = f" ({hint})" if hint else ""
    for line in lines or ["invalid configuration"]:
        click.echo(f"error: {line}{suffix}", err=True)
    sys.exit(1)


def safe_url(url: str) -> str:
    """`url` with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "store"


@dataclass
class Session:
    """The config path given on the command line, and what is loaded from it on demand."""

    config_path: Path
    _config: Config | None = field(default=None, repr=False)

    def config(self) -> Config:
        """The loaded gateway.yaml; a ConfigError exits 1 with its file:line problems."""
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except GatewayError as exc:
                # A loaded config carries these in its warnings (serve logs them, check prints
                # them); a failed one has none, yet a misspelt variable may be the very cause
                # (GATEWAY_CONFIG_FILE=…: "gateway.yaml: file not found").
                for warning in environment_warnings(os.environ):
                    click.echo(f"warning: {warning}", err=True)
                fail(exc)
        return self._config

    def policies(self) -> Callable[[], RoleGraph]:
        """The roles of policies/, loaded on first use, so that commands that need no role
        (list, delete, token reset...) keep working while policies/ is broken."""
        cache: list[RoleGraph] = []

        def roles() -> RoleGraph:
            if not cache:
                from gateway.policy import load_route_table

                cache.append(load_route_table(self.config()))
            return cache[0]

        return roles

    def run(self, work: Callable[[Directory], Awaitable[T]]) -> T:
        """Open (and migrate) the store, run `work` on a Directory, close; errors exit 1."""
        return self.run_store(lambda store: work(Directory(store, self.policies())))

    def run_store(self, work: Callable[[Store], Awaitable[T]]) -> T:
        """Open (and migrate) the store, run `work` on it, close; errors exit 1."""
        config = self.config()

        async def go() -> T:
            store = await open_store(config.store_url, migrate=True)
            try:
                return await work(store)
            finally:
                await store.close()

        try:
            return asyncio.run(go())
        except StoreUnavailable as exc:
            fail(exc, hint=safe_url(config.store_url))
        except GatewayError as exc:
            fail(exc)
