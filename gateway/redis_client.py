"""One pipelined connection to a Redis server, for the rate-limit counters (README "Rate limits").

Imports: hiredis (the RESP reply parser) only.

Why not redis-py's asyncio client: measured on the bench machine it spends 80-120 µs of CPU
per command (connection pool, retry and response machinery), as much as the whole proxied
request; this connection spends 8-16 µs. Every caller shares one connection: the commands of
one event-loop step leave in one write, and Redis answers in order, so the replies are
matched to a FIFO of futures (pipelining). The parsing, where protocol bugs hide, is
hiredis's; the writer only frames arrays of bulk strings.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import unquote, urlsplit

import hiredis

_MAX_IN_FLIGHT = 10_000  # commands awaiting replies; beyond that Redis is too slow to wait for
_TIMEOUTS_BEFORE_RECONNECT = 3


class RedisFailure(Exception):
    """Redis could not answer (down, slow, refused the command); the message never holds the URL."""


@dataclass(frozen=True)
class RedisAddress:
    """What a redis:// or rediss:// URL names (the password is not in the repr)."""

    host: str
    port: int
    database: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[user:password@]host[:port][/db]` or `rediss://…` (already validated by the config)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        database=int(path) if path else 0,
        tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def encode(args: tuple[bytes | str | int, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    """Writes commands, feeds every byte read to hiredis, and settles the oldest waiter per reply."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[object]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Commands of one event-loop step leave in one write (one syscall for many requests).
        self._outgoing: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiters.popleft()
                if not waiter.done():  # a caller that timed out has gone; its reply is dropped
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError):
            # Bytes we cannot match to a command: nothing later on this connection can be trusted.
            self._fail("Redis sent a reply that could not be read")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("the connection to Redis closed")

    def _fail(self, why: str) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RedisFailure(why))

    def send(self, args: tuple[bytes | str | int, ...]) -> asyncio.Future[object]:
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            waiter.set_exception(RedisFailure("the connection to Redis closed"))
            return waiter
        if len(self.waiters) >= _MAX_IN_FLIGHT:
            waiter.set_exception(RedisFailure("too many commands waiting for Redis"))
            return waiter
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(encode(args))
        self.waiters.append(waiter)
        return waiter

    def _flush(self) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if self.transport is not None and not self.closed:
            self.transport.write(data)


class RedisClient:
    """Commands over one shared, lazily (re)opened connection; every wait bounded by `timeout`."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self._address = parse_redis_url(url)
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None
        self._timeouts = 0  # calls in a row that got no answer in time

    async def call(self, *args: bytes | str | int, timeout: float | None = None) -> object:
        """One command's reply (an error reply raises RedisFailure with Redis's message), within
        `timeout` seconds (default: the client's)."""
        try:
            async with asyncio.timeout(self._timeout if timeout is None else timeout):
                protocol = self._protocol
                if protocol is None or protocol.closed:
                    protocol = await self._connection()
                reply = await protocol.send(args)
        except TimeoutError:
            self._timed_out()
            raise RedisFailure("Redis did not answer in time") from None
        self._timeouts = 0
        if isinstance(reply, hiredis.ReplyError):
            raise RedisFailure(f"Redis refused the command: {str(reply)[:200]}")
        return reply

    def _timed_out(self) -> None:
        # A link that died without a reset (the Redis host gone) stays "open" for minutes:
        # after a few calls in a row without an answer, drop it and connect again.
        self._timeouts += 1
        protocol = self._protocol
        if self._timeouts >= _TIMEOUTS_BEFORE_RECONNECT and protocol is not None:
            self._timeouts = 0
            self._protocol = None
            if protocol.transport is not None:
                protocol.transport.abort()

    async def _connection(self) -> _Protocol:
        # One opening at a time, shared by every caller that needs it; a caller's timeout
        # does not cancel it for the others.
        if self._opening is None or self._opening.done():
            self._opening = asyncio.create_task(self._open())
            # Retrieved here too, so a failure nobody waited for is not reported as lost.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Protocol:
        try:
            # Bounded on its own: callers stop waiting at their timeout, but a server that accepts
            # and never answers must not keep this (shared) opening alive for ever.
            async with asyncio.timeout(4 * self._timeout):
                return await self._handshake()
        except TimeoutError:
            raise RedisFailure("Redis did not answer in time") from None

    async def _handshake(self) -> _Protocol:
        address = self._address
        context = ssl.create_default_context() if address.tls else None
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                _Protocol, address.host, address.port, ssl=context
            )
        except (OSError, ssl.SSLError) as exc:
            raise RedisFailure(f"cannot connect to Redis: {type(exc).__name__}") from None
        setup: list[tuple[bytes | str | int, ...]] = []
        if address.password is not None:
            auth: tuple[bytes | str | int, ...] = ("AUTH", address.password)
            setup.append(("AUTH", address.username, address.password) if address.username else auth)
        if address.database:
            setup.append(("SELECT", address.database))
        for command in setup:
            try:
                reply = await protocol.send(command)
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.close()
                raise
            if isinstance(reply, hiredis.ReplyError):
                if protocol.transport is not None:
                    protocol.transport.close()
                # Redis's own words (WRONGPASS, NOAUTH, DB index out of range) never quote the password.
                raise RedisFailure(f"Redis refused {command[0]!s}: {str(reply)[:200]}")
        self._protocol = protocol
        return protocol

    async def close(self) -> None:
        """Close the connection (commands still waiting fail)."""
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
