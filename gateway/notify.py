"""Change notifications on PostgreSQL: LISTEN on a connection of its own, waking the change feed.

Imports: sqlalchemy (connect arguments of the store's engine); asyncpg when it runs.

Migration 0004 makes every insert into `changes` send NOTIFY gateway_changes when its
transaction commits, whoever writes it. An instance listening polls at once instead of
at its next tick, so a revocation reaches it in milliseconds. The poll stays the safety
net: a notification lost with a dropped connection delays a change by one interval at
most, never loses it. The connection is checked every few seconds (a dead link sends no
error by itself) and reopened with back-off; on reopening the feed is woken, since
notifications sent meanwhile are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("gateway.notify")

CHANNEL = "gateway_changes"
_CHECK_SECONDS = 5.0
_TIMEOUT = 3.0
_BACKOFF = (0.5, 30.0)  # first retry, longest wait


def connect_arguments(engine: AsyncEngine) -> dict[str, Any]:
    """What asyncpg.connect needs to reach the store's database (host, user, password, ssl…)."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    if args:
        kwargs = {"dsn": args[0], **kwargs}
    # SQLAlchemy-only options (the prepared-statement cache size and its naming) are not asyncpg's.
    for key in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"):
        kwargs.pop(key, None)
    return {**kwargs, "timeout": _TIMEOUT, "command_timeout": _TIMEOUT}


class Notifications:
    """Keeps one LISTEN connection open and sets `wake` on every notification."""

    def __init__(self, engine: AsyncEngine, wake: asyncio.Event) -> None:
        self._arguments = connect_arguments(engine)
        self._wake = wake
        self._connected = False
        self._was_up = False

    @property
    def connected(self) -> bool:
        """Whether notifications currently arrive (for tests and logs)."""
        return self._connected

    async def run(self) -> None:
        """Listen for ever, reconnecting with back-off (a background task of the server)."""
        # Imported here, on PostgreSQL only: asyncpg adds about 2.5 MB to every process that
        # loads it, and a gateway on SQLite never needs it.
        import asyncpg

        delay = _BACKOFF[0]
        logged = False
        while True:
            try:
                await self._listen_once()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                if self._was_up:  # it had been up: a new outage, the back-off starts again
                    delay, logged = _BACKOFF[0], False
                if not logged:
                    log.warning(
                        "change notifications unavailable; polling every 250 ms until they are back",
                        extra={"error": type(error).__name__},
                    )
                    logged = True
            self._was_up = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF[1])

    async def _listen_once(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(**self._arguments)
        lost = asyncio.Event()
        try:
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener(CHANNEL, self._notified)
            self._connected = self._was_up = True
            self._wake.set()  # whatever was sent while no connection listened
            log.info("listening for change notifications")
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CHECK_SECONDS):
                        await lost.wait()
                if not lost.is_set():
                    # A half-open link is silent: ask something, within the timeout.
                    await connection.fetchval("SELECT 1", timeout=_TIMEOUT)
            raise ConnectionResetError("the notification connection closed")
        finally:
            self._connected = False
            with contextlib.suppress(Exception):
                await connection.close(timeout=_TIMEOUT)
            if not connection.is_closed():
                connection.terminate()

    def _notified(self, *_: object) -> None:
        self._wake.set()
