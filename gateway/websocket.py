"""WebSocket: authorised handshakes relayed message by message, and live revocation.

Imports: decision, errors, handshake, headers, metrics, proxy, upstream, aiohttp's
WebSocket protocol (the reader, writer and queue its own client uses).

The gateway ends the WebSocket on both sides (README "WebSocket"): the client's with
aiohttp's server WebSocket, the upstream's on the pooled connection that carried the
handshake. Nothing is tunnelled as bytes: every message is parsed on one side and framed
again on the other, only after the upstream's 101 proved it speaks WebSocket (the right
`Sec-WebSocket-Accept` for the gateway's own key). Each pump awaits the other side's
write buffer, so a slow reader holds at most about one message per direction.

Open sockets are kept in a `Sockets` registry: the change feed (a credential or user
changed, on this instance or another), a reload, a credential's expiry and an
unreachable store make it decide each affected socket's handshake again and close the
ones that no longer pass (1008; 1013 when the store cannot say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMessage, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.http_websocket import WebSocketError, WebSocketWriter
from aiohttp.streams import EofStream
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ClientLimits
from gateway.decision import Decider, Decision, Settings
from gateway.errors import StoreUnavailable, UpstreamError
from gateway.handshake import accept_for, new_key
from gateway.metrics import Metrics
from gateway.proxy import Forwarder, Outcome
from gateway.store import Change
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway.websocket")

Closed = tuple[str, int | None, str]  # (who closed: client | upstream, close code, reason)

MAX_MESSAGE = 4 * 1024 * 1024  # bytes; a larger message closes the socket with 1009
_READER_LIMIT = MAX_MESSAGE + 1  # aiohttp refuses a message of its limit or more
_QUEUE_LIMIT = 64 * 1024  # bytes parsed ahead of the relay before the socket stops reading
_CHECK_EVERY = 0.25  # seconds between expiry and store-trust checks of open sockets
# Close codes that say what happened on the wire and must never be sent in a close frame.
_NOT_SENDABLE = {1005: 1000, 1006: 1001, 1015: 1001}
_GOING_AWAY = 1001
_POLICY = 1008
_TRY_AGAIN = 1013


class ClientSocket(web.WebSocketResponse):
    """aiohttp's server WebSocket, answering with the subprotocol the upstream chose.

    The decision has already validated the handshake. aiohttp's own negotiation would log
    the offered subprotocols, the bearer entry among them, when none matches its list.
    """

    def __init__(self, chosen: str | None) -> None:
        super().__init__(
            autoclose=False, autoping=False, compress=False, max_msg_size=_READER_LIMIT, timeout=5.0
        )
        self._chosen = chosen

    def _handshake(self, request: web.BaseRequest) -> tuple[CIMultiDict[str], str | None, int, bool]:
        key = request.headers["Sec-WebSocket-Key"].strip()
        headers: CIMultiDict[str] = CIMultiDict(
            {"Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept_for(key)}
        )
        if self._chosen is not None:
            headers["Sec-WebSocket-Protocol"] = self._chosen
        return headers, self._chosen, 0, False


class UpstreamSocket:
    """The upstream side: aiohttp's WebSocket reader and writer on the handshake's connection."""

    def __init__(self, upstream: UpstreamResponse) -> None:
        self._upstream = upstream
        protocol = upstream.connection
        transport = protocol.transport
        if transport is None:
            raise UpstreamError("the upstream closed the connection after its 101")
        protocol.read_timeout = None  # an idle socket is never timed out (the route timeout is HTTP's)
        self._queue = WebSocketDataQueue(protocol, _QUEUE_LIMIT, loop=asyncio.get_running_loop())
        # Held here too: the queue keeps only a weak reference to a reader it stalled.
        self._reader = WebSocketReader(self._queue, _READER_LIMIT, compress=False, decode_text=True)
        protocol.set_parser(self._reader, self._queue)
        self._writer = WebSocketWriter(protocol, transport, use_mask=True)

    async def receive(self) -> WSMessage:
        """The next message, or CLOSED (connection lost) / ERROR (protocol error, too big)."""
        try:
            return await self._queue.read()  # type: ignore[return-value]
        except EofStream:
            return WSMessage(WSMsgType.CLOSED, None, None)
        except WebSocketError as exc:
            return WSMessage(WSMsgType.ERROR, exc, None)
        except (ConnectionError, OSError) as exc:
            return WSMessage(WSMsgType.ERROR, exc, None)

    async def send(self, kind: WSMsgType, data: bytes) -> None:
        """Send one message (or a ping/pong) upstream; waits while the upstream is slow to read."""
        await self._writer.send_frame(data, kind)

    async def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (best effort) and drop the connection."""
        try:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                async with asyncio.timeout(1.0):
                    await self._writer.close(_sendable(code), reason)
        except TimeoutError:
            pass
        finally:
            self._upstream.close()


def _sendable(code: int | None) -> int:
    if code is None:
        return 1000
    return _NOT_SENDABLE.get(code, code)


@dataclass(eq=False)
class OpenSocket:
    """One relayed WebSocket, as the registry sees it (the handshake is kept to decide again)."""

    route: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    user: str | None
    expires_at: float | None  # epoch seconds the credential expires at (None: never, or public)
    pumps: list[asyncio.Task[Any]] = field(default_factory=list)
    # (closed_by, code to the client, code to the upstream, error) when the gateway ended it.
    ended: tuple[str, int, int, str | None] | None = None

    def end(self, closed_by: str, client_code: int, upstream_code: int, error: str | None = None) -> None:
        """Close this socket from outside its relay (revoked, shutdown)."""
        if self.ended is None:
            self.ended = (closed_by, client_code, upstream_code, error)
            for pump in self.pumps:
                pump.cancel()


class Sockets:
    """The open WebSockets of this process, and the checks that close revoked ones."""

    def __init__(
        self,
        decider: Decider,
        settings: Callable[[], Settings],
        trusted: Callable[[], bool],
        metrics: Metrics,
    ) -> None:
        self._decider = decider
        self._settings = settings
        self._trusted = trusted
        self._metrics = metrics
        self._open: set[OpenSocket] = set()
        self._checking: set[asyncio.Task[None]] = set()
        # Sockets whose last check could not reach the store: checked again every tick until
        # one succeeds (the change that asked for the check has already gone by in the feed).
        self._unchecked: set[OpenSocket] = set()
        self.closing = False  # shutdown: no new socket is relayed

    def __len__(self) -> int:
        return len(self._open)

    def add(self, socket: OpenSocket) -> None:
        """Track `socket` until `discard`."""
        self._open.add(socket)
        self._metrics.websockets_open.labels(socket.route).inc()

    def discard(self, socket: OpenSocket) -> None:
        """`socket` ended."""
        self._unchecked.discard(socket)
        if socket in self._open:
            self._open.remove(socket)
            self._metrics.websockets_open.labels(socket.route).dec()

    def on_changes(self, changes: list[Change]) -> None:
        """Change-feed listener: decide again the sockets of every user that changed."""
        users = {change.user for change in changes}
        self.recheck(socket for socket in self._open if socket.user in users)

    def on_reload(self) -> None:
        """A new configuration: every socket's route, rule and permission may have changed."""
        self.recheck(self._open)

    def recheck(self, sockets: Iterable[OpenSocket]) -> None:
        """Decide the handshake of each of `sockets` again, in the background."""
        chosen = [socket for socket in sockets if socket.ended is None]
        if chosen:
            task = asyncio.create_task(self._recheck(chosen))
            self._checking.add(task)
            task.add_done_callback(self._checking.discard)

    async def _recheck(self, sockets: list[OpenSocket]) -> None:
        settings = self._settings()
        for socket in sockets:
            if socket.ended is not None:
                continue
            try:
                decision = await self._decider.decide(settings, "GET", socket.raw_path, socket.headers)
            except Exception:  # noqa: BLE001 - one socket's failed check must not stop the others'
                log.exception("could not check an open WebSocket again", extra={"route": socket.route})
                self._unchecked.add(socket)
                continue
            error = decision.error
            if isinstance(error, StoreUnavailable):
                self._unchecked.add(socket)
                continue
            self._unchecked.discard(socket)
            if error is not None or not decision.websocket:
                socket.end("revoked", _POLICY, _GOING_AWAY, error.refusal.value if error else "forbidden")

    async def run(self) -> None:
        """Every quarter second: expired credentials decided again, and 1013 when the store
        has not been read for longer than the outage grace."""
        while True:
            await asyncio.sleep(_CHECK_EVERY)
            if not self._open:
                continue
            if not self._trusted():
                for socket in list(self._open):
                    socket.end("revoked", _TRY_AGAIN, _GOING_AWAY, "store_unavailable")
                continue
            now = time.time()
            for socket in list(self._open):
                if socket.expires_at is not None and socket.expires_at <= now:
                    # Its credential's expiry has passed: no leeway for an open socket.
                    socket.end("revoked", _POLICY, _GOING_AWAY, "token_expired")
            self.recheck(self._unchecked & self._open)
            self._unchecked.clear()

    def close_all(self) -> None:
        """Shutdown: every open socket gets 1001 now."""
        self.closing = True
        for socket in list(self._open):
            socket.end("shutdown", _GOING_AWAY, _GOING_AWAY, "shutdown")

    async def stop(self) -> None:
        """Cancel rechecks still running (at close)."""
        for task in list(self._checking):
            task.cancel()
        for task in list(self._checking):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass(slots=True)
class Ended:
    """What the access line of a socket says when it ends."""

    closed_by: str
    duration_ms: float
    bytes_in: int  # client → upstream, message payloads
    bytes_out: int  # upstream → client
    error: str | None = None

    def fields(self) -> dict[str, object]:
        """The extra access-log fields."""
        return {
            "closed_by": self.closed_by,
            "socket_ms": self.duration_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class WebSocketRelay:
    """Opens the upstream side of an authorised handshake and relays until either side ends."""

    def __init__(self, forwarder: Forwarder, sockets: Sockets) -> None:
        self._forwarder = forwarder
        self.sockets = sockets

    async def open(
        self,
        request: web.BaseRequest,
        decision: Decision,
        *,
        target: str,
        headers: CIMultiDict[str],
        cors_headers: dict[str, str] | None,
        request_id: str,
        outcome: Outcome,
        limits: ClientLimits,
    ) -> tuple[web.StreamResponse, Ended | None]:
        """Relay one handshake: (the client response, how the socket ended; None when the
        upstream's answer was not a 101 and went back as plain HTTP)."""
        route = decision.route
        assert route is not None
        principal = decision.principal
        expires = principal.expires_at if principal is not None else None
        # Registered before the handshake goes upstream: a revocation that arrives while the
        # upstream answers must find this socket too (it then never opens, or closes at once).
        socket = OpenSocket(
            route=route.config.name,
            raw_path=decision.raw_path,
            headers=request.headers,
            user=principal.user if principal is not None else None,
            expires_at=expires.timestamp() if expires is not None else None,
        )
        self.sockets.add(socket)
        try:
            offered = decision.subprotocols
            key = new_key()
            _handshake_headers(headers, key, offered)
            answer = await self._forwarder.handshake(
                request,
                route.config,
                target=target,
                headers=headers,
                cors_headers=cors_headers,
                rate_headers=decision.rate_headers,
                request_id=request_id,
                outcome=outcome,
                limits=limits,
            )
            if not isinstance(answer, UpstreamResponse):
                return answer, None
            try:
                chosen = _check_upgrade(answer, key, offered)
            except UpstreamError:
                answer.close()
                raise
            upstream = UpstreamSocket(answer)
            client = ClientSocket(chosen)
            if cors_headers:
                client.headers.update(cors_headers)
            for name, value in decision.rate_headers:
                client.headers.add(name, value)
            client.headers["X-Request-Id"] = request_id
            try:
                await client.prepare(request)
            except BaseException:
                await upstream.close(_GOING_AWAY)
                raise
            ended = await self._relay(client, upstream, socket)
        finally:
            self.sockets.discard(socket)
        return client, ended

    async def _relay(self, client: ClientSocket, upstream: UpstreamSocket, socket: OpenSocket) -> Ended:
        started = time.monotonic()
        counts = [0, 0]  # bytes client → upstream, upstream → client

        async def from_client() -> Closed:
            while True:
                message = await client.receive()
                kind = message.type
                if kind is WSMsgType.TEXT:
                    data = message.data.encode()
                elif kind in (WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG):
                    data = message.data
                elif kind is WSMsgType.CLOSE:
                    return "client", message.data, message.extra or ""
                elif kind is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
                    return "client", message.data.code, ""  # 1009 too big, 1007 not UTF-8, …
                else:  # CLOSING, CLOSED, ERROR: aiohttp has closed the client side already
                    return "client", client.close_code or 1006, ""
                counts[0] += len(data)
                await upstream.send(kind, data)

        async def from_upstream() -> Closed:
            while True:
                message = await upstream.receive()
                kind = message.type
                if kind is WSMsgType.TEXT:
                    data = message.data.encode()
                    counts[1] += len(data)
                    await client.send_frame(data, WSMsgType.TEXT)
                elif kind is WSMsgType.BINARY:
                    counts[1] += len(message.data)
                    await client.send_frame(message.data, WSMsgType.BINARY)
                elif kind is WSMsgType.PING:
                    await client.ping(message.data)
                elif kind is WSMsgType.PONG:
                    await client.pong(message.data)
                elif kind is WSMsgType.CLOSE:
                    return "upstream", message.data, message.extra or ""
                elif kind is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
                    return "upstream", message.data.code, ""
                else:
                    return "upstream", 1006, ""

        pumps = [asyncio.create_task(from_client()), asyncio.create_task(from_upstream())]
        socket.pumps = pumps
        error: str | None = None
        try:
            if self.sockets.closing:
                socket.end("shutdown", _GOING_AWAY, _GOING_AWAY, "shutdown")
            elif socket.ended is not None:  # revoked (or shut down) while the handshake was upstream
                for pump in pumps:
                    pump.cancel()
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            reason = ""
            if socket.ended is not None:
                closed_by, client_code, upstream_code, error = socket.ended
            else:
                closed_by, code, reason = _first_result(done)
                client_code = upstream_code = _sendable(code)
            await upstream.close(upstream_code, reason)
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                async with asyncio.timeout(1.0):
                    await client.close(code=client_code, message=reason.encode())
        except asyncio.CancelledError:
            # The shutdown cut: the handler itself is being cancelled.
            for pump in pumps:
                pump.cancel()
            await upstream.close(_GOING_AWAY)
            raise
        return Ended(
            closed_by=closed_by,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
            bytes_in=counts[0],
            bytes_out=counts[1],
            error=error,
        )


def _first_result(done: set[asyncio.Task[Closed]]) -> Closed:
    for pump in done:
        if not pump.cancelled() and pump.exception() is None:
            return pump.result()
    # A write to one side failed (it went away): whoever it was, the socket is over.
    return "client", 1006, ""


def _handshake_headers(headers: CIMultiDict[str], key: str, offered: tuple[str, ...]) -> None:
    """The gateway's own handshake with the upstream: its key, version 13, the offered
    subprotocols without the bearer entry, no extensions (each side is framed anew)."""
    for name in [name for name in headers if name.lower().startswith("sec-websocket-")]:
        headers.popall(name, None)
    headers["Upgrade"] = "websocket"
    headers["Connection"] = "Upgrade"
    headers["Sec-WebSocket-Version"] = "13"
    headers["Sec-WebSocket-Key"] = key
    if offered:
        headers["Sec-WebSocket-Protocol"] = ", ".join(offered)


def _check_upgrade(answer: UpstreamResponse, key: str, offered: tuple[str, ...]) -> str | None:
    """The subprotocol the upstream chose; UpstreamError (502) unless its 101 is a WebSocket's."""
    headers = answer.headers
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        raise UpstreamError("the upstream's 101 does not upgrade to websocket")
    accepts = headers.getall("Sec-WebSocket-Accept", ())
    if list(accepts) != [accept_for(key)]:
        raise UpstreamError("the upstream's 101 has a wrong Sec-WebSocket-Accept")
    if "Sec-WebSocket-Extensions" in headers:
        raise UpstreamError("the upstream's 101 chose a WebSocket extension nobody offered")
    chosen = headers.getall("Sec-WebSocket-Protocol", ())
    if not chosen:
        return None
    if len(chosen) != 1 or chosen[0].strip() not in offered:
        raise UpstreamError("the upstream's 101 chose a subprotocol that was not offered")
    return chosen[0].strip()
