"""A lean HTTP/1.1 client for the upstreams: pooled keep-alive connections driven directly.

Imports: errors, aiohttp's protocol layer (ResponseHandler: the C response parser, flow
control and read timeouts its own client uses).

Why not aiohttp.ClientSession: a proxy already holds a finished header set and an encoded
target, so the session's per-request work (URL and header objects, default headers,
cookie jar, tracing, timeout contexts, the ClientRequest/ClientResponse pair) is pure
cost; it was about half of a bare aiohttp proxy's CPU. Here one request is one head
write on a pooled connection and one parsed response; bodies stream both ways with
back-pressure. bench/RESULTS.md has the before and after.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import ClientError, ServerDisconnectedError, SocketTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from gateway.errors import BadRequest, PayloadTooLarge, RequestTimeout, UpstreamError, UpstreamTimeout
from gateway.upstream_tls import UpstreamTls, client_context, handshake_reason

_READ_BUFSIZE = 64 * 1024  # the parser buffers about twice this per connection (README "Slow clients")
_KEEPALIVE = 30.0  # seconds an idle pooled connection is kept
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# aiohttp's client sent Content-Length: 0 for these when there is no body; some upstreams want it.
_LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_DISCONNECTS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
_MAX_HEAD = 64 * 1024
# Control characters other than HTAB, CR and LF: never in a response head (RFC 9110 section 5.5).
_HEAD_CONTROLS = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an upstream URL points: address, TLS, and what goes into Host and the target."""

    host: str
    port: int
    tls: bool
    host_header: str
    base_path: str

    @classmethod
    def parse(cls, upstream: str) -> Endpoint:
        """An Endpoint from a validated `http(s)://host[:port][/base]` URL."""
        parts = urlsplit(upstream)
        tls = parts.scheme == "https"
        host = parts.hostname or ""
        default = 443 if tls else 80
        host_header = parts.netloc
        if parts.port == default:  # as browsers and aiohttp send it: no default port in Host
            host_header = f"[{host}]" if ":" in host else host
        return cls(
            host=host,
            port=parts.port or default,
            tls=tls,
            host_header=host_header,
            base_path=parts.path,
        )


class Connection(ResponseHandler):
    """aiohttp's response protocol, told when a request is in flight.

    Bytes from the upstream while no request is in flight can only be a stray or
    desynchronised answer: the connection is closed rather than ever handing them to
    the next request. Each request gets a fresh parser (as aiohttp's client does), so
    no leftover of one response can begin the next.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.in_flight = False
        # Until the answer's head is in, the read timer is ours to start (after the body);
        # from then on aiohttp's protocol runs it (restarted per chunk, stopped while the
        # client is slow to take the body, stopped at its end).
        self.awaiting_head = False
        # The incomplete response head read so far (b"" until bytes arrive); None once the
        # final head is whole (see `_check_head`).
        self._head: bytes | None = None

    def prepare(self, head_only: bool, timeout: float) -> None:
        """Set up a fresh response parser for one request."""
        self.in_flight = True
        self.awaiting_head = True
        self._head = b""
        self.set_response_params(
            skip_payload=head_only,
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=timeout,
            read_bufsize=_READ_BUFSIZE,
        )

    def idle(self) -> None:
        """The exchange is over: no read timer may outlive it, and no byte is expected."""
        self.in_flight = False
        self.awaiting_head = False
        self._head = None
        self._drop_timeout()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's stream calls this after every read that leaves its buffer low, paused or
        # not; unpaused, it only fed the parser b"" (it resumes decompression, which we never
        # ask for) and asked the transport to resume what was never paused.
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        if not self.in_flight and data:
            self.force_close()
            self.close()
            return
        if self._head is not None and data and not self._check_head(data):
            self.set_exception(
                HttpProcessingError(message="a bare CR or LF, or a control character, in the response head")
            )
            if self.transport is not None:
                self.transport.close()
            return
        super().data_received(data)

    def _check_head(self, data: bytes) -> bool:
        """False when a response head has a bare CR or LF, or a control character other than HTAB.

        aiohttp's response parser is lenient: it takes a bare LF for a line end, so
        `X-A: a\nSet-Cookie: x` would reach the client as two headers (a header injected
        by whoever controls one header value upstream), and it passes control characters
        in values and the reason phrase on. Only heads are checked (a body may hold any
        byte); a 1xx head is followed by another. Scanned in place: a head that arrives in
        one piece (the usual case) costs a few C-level counts and one regex search.
        """
        pending = self._head
        buffer = pending + data if pending else data
        start = 0
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                # Incomplete: a CR at the very end may yet be followed by its LF.
                stop = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
                if not _sound_head(buffer, start, stop):
                    return False
                # aiohttp's parser refuses a head this long itself.
                self._head = buffer[start:] if len(buffer) - start <= _MAX_HEAD else None
                return True
            if not _sound_head(buffer, start, end + 4):
                return False
            if buffer[start + 9 : start + 10] != b"1" or buffer[start + 9 : start + 12] == b"101":
                self._head = None
                return True
            start = end + 4


def _sound_head(buffer: bytes, start: int, stop: int) -> bool:
    """Whether buffer[start:stop] has only CRLF line ends and no control character but HTAB.

    Plain byte counts and one translate (all in C, well under a microsecond for a usual
    head); a regex with look-arounds cost several microseconds per response.
    """
    lines = buffer.count(b"\n", start, stop)
    if lines != buffer.count(b"\r\n", start, stop) or lines != buffer.count(b"\r", start, stop):
        return False
    head = buffer[start:stop]
    return len(head.translate(None, _HEAD_CONTROLS)) == len(head)


class UpstreamResponse:
    """The status line and headers of an upstream answer; `content` streams its body."""

    __slots__ = ("status", "reason", "headers", "content", "_protocol", "_pool", "_writer", "_done")

    def __init__(
        self,
        message: RawResponseMessage,
        content: StreamReader,
        protocol: Connection,
        pool: ConnectionPool,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        self._protocol = protocol
        self._pool = pool
        self._writer = writer
        self._done = False

    @property
    def connection(self) -> Connection:
        """The connection this answer came on (after a 101, the WebSocket's)."""
        return self._protocol

    def release(self) -> None:
        """Give the connection back: to the pool when the exchange finished cleanly, else closed."""
        if self._done:
            return
        self._done = True
        writer = self._writer
        reusable = self.content.is_eof() and (writer is None or writer.done())
        if writer is not None and not writer.done():
            writer.cancel()
        self._pool.release(self._protocol, reusable=reusable)

    def close(self) -> None:
        """Drop the connection (the exchange was cut short)."""
        if self._done:
            return
        self._done = True
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._pool.release(self._protocol, reusable=False)


class ConnectionPool:
    """Keep-alive connections to one upstream, at most `limit` open at once."""

    def __init__(
        self, endpoint: Endpoint, limit: int, tls: UpstreamTls | None = None, route: str = ""
    ) -> None:
        self.endpoint = endpoint
        self.route = route
        self._limit = limit
        self._idle: deque[tuple[Connection, float]] = deque()
        self._open = 0  # idle + busy
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False
        self._retired = False  # replaced by a reload: serves its waiters, keeps nothing idle
        self._ssl: ssl.SSLContext | None = client_context(tls) if endpoint.tls else None
        self._server_name = (tls.server_name if tls is not None else None) or endpoint.host

    async def acquire(self, *, fresh: bool, timeout: float) -> tuple[Connection, bool]:
        """A connection and whether it was reused from the pool; waits while `limit` are busy."""
        idle = self._idle
        if not fresh and (reused := self._take_idle()) is not None:
            return reused, True
        if fresh and idle:
            # A retry wants a new connection: make room by closing the oldest idle one.
            self._discard(idle.popleft()[0])
        deadline = time.monotonic() + timeout
        while self._open >= self._limit:
            if self._closed:
                raise UpstreamError("the gateway is shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout(
                    f"no upstream connection became free within {timeout:g}s (max_connections: {self._limit})"
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                continue
            except BaseException:
                # Woken, then cancelled before taking the slot: hand the wake-up on.
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if not fresh and (reused := self._take_idle()) is not None:
                return reused, True
        self._open += 1
        try:
            return await self._connect(min(timeout, 10.0)), False
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    def _take_idle(self) -> Connection | None:
        """The most recently used idle connection still fit for a request (the dead are discarded)."""
        idle = self._idle
        while idle:
            protocol, _ = idle.pop()  # the most recently used: least likely to have timed out
            if protocol.is_connected() and not protocol.should_close:
                return protocol
            self._discard(protocol)
        return None

    async def _connect(self, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(loop),
                    endpoint.host,
                    endpoint.port,
                    ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl is not None else None,
                ),
                timeout,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"could not connect to the upstream within {timeout:g}s") from exc
        except ssl.SSLError as exc:
            # The client sees 502; the operator needs the reason (unknown CA, name, expiry).
            log.warning(
                "upstream TLS handshake failed",
                extra={
                    "route": self.route,
                    "upstream": f"{endpoint.host}:{endpoint.port}",
                    "reason": handshake_reason(exc),
                },
            )
            raise UpstreamError("the TLS handshake with the upstream failed") from exc
        except OSError as exc:
            raise UpstreamError("upstream refused or broke the connection") from exc
        return protocol

    def release(self, protocol: Connection, *, reusable: bool) -> None:
        """Return `protocol` to the idle list, or close it when it cannot carry another request."""
        if (
            reusable
            and not self._closed
            and not self._retired
            and protocol.is_connected()
            and not protocol.should_close
        ):
            protocol.idle()
            self._idle.append((protocol, time.monotonic()))
            if self._expiry is None:
                self._expiry = asyncio.get_running_loop().call_later(_KEEPALIVE, self._expire)
            self._wake()
            return
        self._discard(protocol)

    def _discard(self, protocol: Connection) -> None:
        protocol.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _expire(self) -> None:
        self._expiry = None
        cutoff = time.monotonic() - _KEEPALIVE
        idle = self._idle
        while idle and idle[0][1] <= cutoff:
            self._discard(idle.popleft()[0])
        if idle:
            delay = idle[0][1] + _KEEPALIVE - time.monotonic()
            self._expiry = asyncio.get_running_loop().call_later(max(delay, 0.1), self._expire)

    def retire(self) -> None:
        """Stop keeping connections (a reload replaced this pool); requests waiting still go on."""
        self._retired = True
        while self._idle:
            self._discard(self._idle.pop()[0])

    def close(self) -> None:
        """Close every idle connection; busy ones close when released."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._idle:
            self._discard(self._idle.pop()[0])
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


log = logging.getLogger("gateway.upstream")

PoolKey = tuple[str, str, int, UpstreamTls | None]


class UpstreamClient:
    """Pools by (route, upstream, max_connections), and the request/response exchange on them.

    Separate pools per route keep a route full of long downloads from starving the others.
    """

    def __init__(self) -> None:
        self._pools: dict[PoolKey, ConnectionPool] = {}

    def pool_for(
        self, route: str, upstream: str, max_connections: int, tls: UpstreamTls | None = None
    ) -> ConnectionPool:
        """The pool of `route` for this upstream URL, size and TLS settings (created on first use)."""
        key = (route, upstream, max_connections, tls)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ConnectionPool(Endpoint.parse(upstream), max_connections, tls, route)
        return pool

    async def send(
        self,
        pool: ConnectionPool,
        method: str,
        target: str,
        headers: Mapping[str, str],
        *,
        body: StreamReader | bytes | None,
        length: int | None,
        body_limit: int,
        timeout: float,
        body_timeout: float = 30.0,
        upgrade: bool = False,
    ) -> UpstreamResponse:
        """Send one request and wait for its response head (1xx skipped).

        `target` is the encoded path and query after the endpoint's base path; `body` is
        bytes already read whole (sent with the head), or a stream sent with Content-Length
        `length`, or chunked when `length` is None; a client that pauses a streamed body for
        `body_timeout` seconds gets 408. A reused connection the upstream closed in the
        meantime is retried once on a new one for idempotent requests whose body is not a
        stream, as every HTTP client does. With `upgrade` (a WebSocket handshake) a 101 is an
        answer: the connection is then the caller's (`UpstreamResponse.connection`) until it
        closes the response.
        """
        if isinstance(body, bytes):
            head = _request_head(method, pool.endpoint, target, headers, len(body), True) + body
            body = None
        else:
            head = _request_head(
                method, pool.endpoint, target, headers, None if body is None else length, body is not None
            )
        retry = body is None and method in _IDEMPOTENT
        protocol, reused = await pool.acquire(fresh=False, timeout=timeout)
        while True:
            protocol.prepare(method == "HEAD", timeout)
            transport = protocol.transport
            if transport is None:  # closed between acquire and now
                pool.release(protocol, reusable=False)
                raise UpstreamError("upstream refused or broke the connection")
            transport.write(head)
            writer: asyncio.Task[None] | None = None
            counter: _BodyCounter | None = None
            if body is None:
                protocol.start_timeout()
            else:
                counter = _BodyCounter(body_limit if length is None else None)
                writer = asyncio.create_task(
                    _write_body(protocol, body, length is None, counter, timeout, body_timeout)
                )
            try:
                message, payload = await _read_head(protocol, writer, upgrade)
            except TimeoutError as exc:
                pool.release(protocol, reusable=False)
                if writer is not None:
                    writer.cancel()
                raise UpstreamTimeout(f"upstream did not answer within {timeout:g}s") from exc
            except HttpProcessingError as exc:
                # Not HTTP/1.x, or a head we refuse to relay (bare LF, control characters).
                pool.release(protocol, reusable=False)
                if writer is not None:
                    writer.cancel()
                _raise_body_error(counter)
                raise UpstreamError(f"the upstream's answer is malformed ({exc.message})") from exc
            except (ClientError, OSError) as exc:
                pool.release(protocol, reusable=False)
                if writer is not None:
                    writer.cancel()
                if reused and retry and _is_disconnect(exc):
                    retry = False
                    protocol, reused = await pool.acquire(fresh=True, timeout=timeout)
                    continue
                _raise_body_error(counter)
                raise UpstreamError("upstream refused or broke the connection") from exc
            except BaseException:
                pool.release(protocol, reusable=False)
                if writer is not None:
                    writer.cancel()
                raise
            protocol.awaiting_head = False
            return UpstreamResponse(message, payload, protocol, pool, writer)

    def retain(self, keys: Collection[PoolKey]) -> None:
        """Close the pools whose (route, upstream, max_connections, tls) a reload removed or changed."""
        for key in [key for key in self._pools if key not in keys]:
            self._pools.pop(key).retire()

    async def close(self) -> None:
        """Close every pool (at shutdown)."""
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            pool.close()


async def _read_head(
    protocol: Connection, writer: asyncio.Task[None] | None, upgrade: bool = False
) -> tuple[RawResponseMessage, StreamReader]:
    while True:
        message, payload = await protocol.read()
        if not 100 <= message.code <= 199:
            return message, payload
        if message.code == 101:
            if upgrade:
                return message, payload
            # Never asked for (Upgrade is stripped): the connection is no longer HTTP.
            raise HttpProcessingError(message="the upstream switched protocols unasked")
        # 1xx are interim (103 Early Hints and the like). aiohttp stops the read timer at
        # each bodiless message; the wait for the final answer is bounded again here, or
        # by the body writer once it has sent everything.
        if writer is None or writer.done():
            protocol.start_timeout()


def _is_disconnect(exc: BaseException) -> bool:
    """A reused connection the upstream had closed or reset (the keep-alive race)."""
    if isinstance(exc, ServerDisconnectedError | ConnectionResetError):
        return True
    return isinstance(exc, OSError) and exc.errno in _DISCONNECTS


class _BodyCounter:
    """How much of a body of unknown length has gone upstream, against the route's limit."""

    __slots__ = ("limit", "sent", "exceeded", "stalled")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.sent = 0
        self.exceeded = False
        self.stalled: float | None = None  # the body timeout, when the client paused longer


def _raise_body_error(counter: _BodyCounter | None) -> None:
    if counter is None:
        return
    if counter.exceeded:
        raise PayloadTooLarge(f"request body is larger than the limit of {counter.limit} bytes")
    if counter.stalled is not None:
        raise RequestTimeout(f"the request body paused for more than {counter.stalled:g}s")


async def _write_body(
    protocol: Connection,
    body: StreamReader,
    chunked: bool,
    counter: _BodyCounter,
    timeout: float,
    body_timeout: float,
) -> None:
    """Stream the client's body upstream with back-pressure; start the read timeout after it.

    An upstream that stops reading the body for `timeout` seconds gets the same
    treatment as one that stops answering: the connection is cut and the request is a 504.
    A client that pauses its body for `body_timeout` seconds loses the upstream connection
    it holds (a slow client must not keep a pool slot): 408.
    """
    limit = counter.limit
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                async with asyncio.timeout(body_timeout):
                    chunk = await body.readany()
            except TimeoutError:
                counter.stalled = body_timeout
                protocol.abort()
                protocol.set_exception(ServerDisconnectedError("the client paused its request body"))
                return
            if not chunk:
                break
            counter.sent += len(chunk)
            if limit is not None and counter.sent > limit:
                counter.exceeded = True
                # The upstream must not take a truncated body for a whole one.
                protocol.abort()
                protocol.set_exception(ServerDisconnectedError("request body over the limit"))
                return
            transport = protocol.transport
            if transport is None:
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if protocol.writing_paused:
                stall = loop.call_later(timeout, _stalled, protocol)
                try:
                    await protocol._drain_helper()
                finally:
                    stall.cancel()
        if chunked and protocol.transport is not None:
            protocol.transport.write(b"0\r\n\r\n")
        if protocol.awaiting_head:
            protocol.start_timeout()
    except Exception as exc:  # noqa: BLE001 - whatever broke the body, the exchange must end
        # The client broke off or sent a malformed chunked body, or the upstream went away.
        if protocol.exception() is None:
            protocol.set_exception(ServerDisconnectedError(f"request body not sent: {type(exc).__name__}"))
        protocol.abort()


def _stalled(protocol: Connection) -> None:
    protocol.set_exception(SocketTimeoutError("the upstream stopped reading the request body"))
    protocol.abort()


def _request_head(
    method: str,
    endpoint: Endpoint,
    target: str,
    headers: Mapping[str, str],
    length: int | None,
    has_body: bool,
) -> bytes:
    """The request line and headers, ready for the socket; refuses line breaks in any value.

    `headers` is case-insensitive (a CIMultiDict). The framing is ours alone: any
    Content-Length or Transfer-Encoding in `headers` is dropped and the one matching the
    body we send is written, so nothing a client does to its headers (naming
    Content-Length in `Connection:`, say) can make the upstream read the body as a
    second request.
    """
    lines = [f"{method} {endpoint.base_path}{target} HTTP/1.1\r\n"]
    if "Host" not in headers:
        lines.append(f"Host: {endpoint.host_header}\r\n")
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        lines.extend(f"{n}: {v}\r\n" for n, v in headers.items() if n.lower() not in _FRAMING)
    else:  # the usual case: no framing header to drop, no per-name check
        lines.extend(f"{n}: {v}\r\n" for n, v in headers.items())
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    elif has_body:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif method in _LENGTH_REQUIRED:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # One CR and one LF per line, or a value smuggled a line break into the head.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise BadRequest("a header value contains a line break")
    # surrogateescape gives back the exact bytes the client sent (obs-text included).
    return text.encode("utf-8", "surrogateescape")
