"""The listeners' connections: aiohttp's server protocol with the gateway's limits and refusals.

Imports: config, errors, headers, lifecycle, logs, aiohttp's server protocol.

aiohttp's `RequestHandler` parses requests with its C parser and runs our handler; this
subclass adds what a gateway exposed to the internet needs and aiohttp leaves out:
- a per-process cap of open client connections (`limits.max_connections`): one over it
  gets a JSON 503 `overloaded` and is closed, and the cap is logged, instead of the
  process running out of file descriptors and going silently deaf;
- a time limit on receiving a request head (`limits.header_timeout`), from the accept
  or from the first byte of a keep-alive connection's next request (slow-header clients);
- parser refusals (malformed request line or header, header too long) answered as a
  generic JSON 400 that never quotes the request, counted and logged like every refusal
  (aiohttp's own answer quotes the offending line: a token in an `Authorization` header
  would travel back in it);
- an unexpected exception answered as a JSON 500 with an `X-Request-Id` and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_response
from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from gateway.errors import Refusal
from gateway.headers import new_request_id
from gateway.lifecycle import Lifecycle

log = logging.getLogger("gateway.listener")

# aiohttp names itself and Python with their versions in a `Server` header on every answer it
# writes (a gift to anyone matching exploits to versions) and has no setting for it; answers
# whose upstream sent its own `Server` keep that one (README "Headers").
web_response.SERVER_SOFTWARE = "gateway"  # type: ignore[attr-defined]

# (status, refusal code, request id); called for every refusal the listener gives itself.
RefusalHook = Callable[[int, Refusal, str], None]

_DETAILS = {
    400: (Refusal.BAD_REQUEST, "the request is not valid HTTP/1.1 (malformed request line or header)"),
    500: (Refusal.INTERNAL_ERROR, "the gateway failed to handle this request"),
    504: (Refusal.UPSTREAM_TIMEOUT, "the request timed out"),
}
_OVERLOADED = json.dumps(
    {"error": Refusal.OVERLOADED.value, "detail": "too many open connections; try again shortly"}
).encode()


@dataclass(slots=True)
class ConnectionBudget:
    """Open client connections of this process against `limits.max_connections` (both listeners)."""

    limit: int
    open: int = 0
    refused: int = 0
    _last_warning: float = 0.0

    def take(self) -> bool:
        """Count one more connection; False (and a warning, at most every 10 s) when full."""
        if self.open >= self.limit:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_warning >= 10.0:
                self._last_warning = now
                log.warning(
                    "refusing client connections: limits.max_connections reached",
                    extra={"max_connections": self.limit, "refused_so_far": self.refused},
                )
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        """One connection closed."""
        self.open -= 1


@dataclass(frozen=True, slots=True)
class Guard:
    """What a listener's connections are held to: the budget, the head timer, the refusal hook,
    and the process's lifecycle (while it drains, every answer closes its connection)."""

    budget: ConnectionBudget
    header_timeout: float
    on_refusal: RefusalHook | None = None
    lifecycle: Lifecycle | None = None


class GuardedConnection(RequestHandler):
    """One client connection: aiohttp's protocol with a connection cap, a head timer and JSON refusals."""

    def __init__(self, manager: web.Server, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._budget = guard.budget
        self._header_timeout = guard.header_timeout
        self._on_refusal = guard.on_refusal
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None  # loop time of the current head's first byte
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._budget.take():
            assert isinstance(transport, asyncio.Transport)
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                % len(_OVERLOADED)
                + _OVERLOADED
            )
            transport.close()
            self._manager = None  # connection_lost then has nothing to undo
            return
        self._counted = True
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._budget.give_back()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The first byte of a new request on an idle keep-alive connection starts its head's clock.
        if self._head_started is None and data and not self._request_in_progress and not self._messages:
            self._start_head()
        super().data_received(data)
        if self._head_started is not None and self._messages:
            self._head_started = None  # a whole head is in: the request is the pipeline's now

    def close_if_idle(self) -> None:
        """Close now unless a request is being handled or its head is under way (shutdown:
        aiohttp's own pre_shutdown leaves an idle keep-alive connection open until the client
        closes it).

        A connection accepted but not yet read is a head under way: its request may already wait
        in the socket, and closing would reset it after a proxy in front sent it (a POST that
        proxy may not retry). It gets its answer, with `Connection: close`, or the head timer's.

        Idle is aiohttp's own test (its keep-alive timer's): the handler loop is parked waiting
        for a message. A head that has just been parsed is out of `_messages` one loop turn
        before its request counts as in progress (Python < 3.12 starts the handler task lazily);
        that connection is not parked, so it is not closed in that window."""
        waiter = self._waiter
        parked = waiter is not None and not waiter.done()
        if parked and not self._messages and self._head_started is None:
            self.force_close()

    def _start_head(self) -> None:
        # One timer per connection, re-armed lazily when it fires: a keep-alive connection's
        # requests cost a clock read each, not a timer each.
        if self._header_timeout <= 0:
            return
        now = self._loop.time()
        self._head_started = now
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(now + self._header_timeout, self._check_head_time)

    def _check_head_time(self) -> None:
        self._head_timer = None
        started = self._head_started
        if started is None or self._messages or self._request_in_progress:
            return  # no head under way; the next one starts the timer again
        due = started + self._header_timeout
        if self._loop.time() < due:
            self._head_timer = self._loop.call_at(due, self._check_head_time)
            return
        log.info(
            "closed a client connection: no complete request head within limits.header_timeout",
            extra={"header_timeout": self._header_timeout, "peer": _peer(self.transport)},
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON refusal that never quotes the request (parser errors), logged without its text."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; it can only be cut")
        refusal, detail = _DETAILS.get(status, _DETAILS[500])
        request_id = new_request_id()
        if status >= 500:
            log.error(
                "request failed",
                exc_info=exc,
                extra={"request_id": request_id, "status": status},
            )
        if self._on_refusal is not None:
            self._on_refusal(status, refusal, request_id)
        response = web.json_response(
            {"error": refusal.value, "detail": detail}, status=status, headers={"X-Request-Id": request_id}
        )
        response.force_close()
        return response


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections are `GuardedConnection`s."""

    def __init__(self, handler: Any, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._guard = guard
        lifecycle = guard.lifecycle
        if lifecycle is not None:
            make = self.request_factory

            def request_factory(message: RawRequestMessage, *args: Any) -> web.BaseRequest:
                # Draining: the request is read as if it asked to close, so its answer says
                # `Connection: close` and the connection ends after it (README "Shutdown and drain").
                if lifecycle.draining:
                    message = message._replace(should_close=True)
                return make(message, *args)

            self.request_factory = request_factory

    def __call__(self) -> RequestHandler:
        return GuardedConnection(self, loop=self._loop, guard=self._guard, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner (the admin listener) whose server is a `GuardedServer`."""

    def __init__(self, app: web.Application, *, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up and freezes it
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            guard=self._guard,
            **self._kwargs,
        )
