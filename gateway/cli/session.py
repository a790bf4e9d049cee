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

from gateway.cli.remote import AdminTarget, RemoteDirectory, check_admin_url
from gateway.config import Config, environment_warnings, load_config
from gateway.errors import ConfigError, GatewayError, StoreUnavailable
from gateway.services import Directory, RoleGraph
from gateway.store import Store, open_store

# What a user, token, key, audit or explain command works on: the store, or the admin API.
Backend = Directory | RemoteDirectory

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
    """The config path given on the command line, and what is loaded from it on demand.

    `admin_url` (or GATEWAY_ADMIN_URL) switches the user, token, key, audit and explain
    commands to remote mode: they go through that gateway's admin API instead of the store.
    """

    config_path: Path
    admin_url: str | None = None
    admin_token_file: str | None = None
    admin_ca_file: str | None = None
    _config: Config | None = field(default=None, repr=False)

    def remote(self) -> AdminTarget | None:
        """The admin API to work through (None: the local store); bad settings exit 1."""
        url = self.admin_url or os.environ.get("GATEWAY_ADMIN_URL") or None
        if url is None:
            return None
        try:
            url = check_admin_url(url)
        except ValueError as exc:
            fail(GatewayError(f"--admin-url: {exc}"))
        if self.admin_token_file is not None:
            try:
                token = Path(self.admin_token_file).read_text().strip()
            except OSError as exc:
                fail(GatewayError(f"--admin-token-file: cannot read {self.admin_token_file}: {exc.strerror}"))
        else:
            token = os.environ.get("GATEWAY_ADMIN_TOKEN", "").strip()
        if not token:
            fail(
                GatewayError(
                    "remote mode needs an admin token: set GATEWAY_ADMIN_TOKEN or --admin-token-file FILE"
                )
            )
        return AdminTarget(url, token, self.admin_ca_file)

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

    def run(self, work: Callable[[Backend], Awaitable[T]]) -> T:
        """Run `work` on the admin API (remote mode) or on a Directory over the store (opened,
        migrated and closed here); errors exit 1."""
        target = self.remote()
        if target is None:
            return self.run_store(lambda store: work(Directory(store, self.policies())))

        async def go() -> T:
            directory = RemoteDirectory(target)
            try:
                return await work(directory)
            finally:
                await directory.close()

        try:
            return asyncio.run(go())
        except GatewayError as exc:
            fail(exc)

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
