"""The proxy handler: decide (gateway.decision), then mutate and forward; record every request.

Imports: decision, auth, cors, errors, forward_auth, headers, lifecycle, logs, metrics, paths, proxy.

```
0 GATEWAY   /.gateway/* on the canonical path: the gateway's own endpoints, never forwarded
1 DECIDE    method → route → path → (preflight) → rule → credential → permission → origin
2 MUTATE    strip client identity/hop-by-hop/forwarding headers, then set ours
3 FORWARD   stream to the upstream and back          → 502 upstream_unavailable | 504 upstream_timeout
4 RECORD    one JSON line per request
```
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from multidict import CIMultiDict

from gateway.assertion import Assertions
from gateway.cors import OriginIndex
from gateway.decision import Decider, Decision, Settings, is_gateway_path, printable
from gateway.errors import GatewayError, OriginNotAllowed, Refusal, refusal
from gateway.forward_auth import ForwardAuth
from gateway.headers import request_id_from
from gateway.lifecycle import Lifecycle
from gateway.logs import write_access
from gateway.metrics import Metrics
from gateway.paths import split_target
from gateway.proxy import Forwarder, Outcome, refuse_oversized, refuse_transfer_codings
from gateway.token_endpoint import JWKS_PATH, TOKEN_PATH, TokenEndpoint
from gateway.websocket import WebSocketRelay

log = logging.getLogger("gateway.pipeline")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_TEXT = {status: str(status) for status in range(100, 600)}  # the metric label, made once

__all__ = ["Pipeline", "Settings"]


class Pipeline:
    """The proxy listener's request handler (one per process)."""

    def __init__(
        self,
        settings: Settings,
        decider: Decider,
        forwarder: Forwarder,
        websockets: WebSocketRelay,
        token_endpoint: TokenEndpoint,
        assertions: Assertions,
        metrics: Metrics,
        origins: OriginIndex,
        lifecycle: Lifecycle,
    ) -> None:
        self.settings = settings
        self._lifecycle = lifecycle
        self.decider = decider
        self._forwarder = forwarder
        self._websockets = websockets
        self._tokens = token_endpoint
        self._assertions = assertions
        self._metrics = metrics
        self._origins = origins
        self._forward_auth = ForwardAuth(self.decider)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Run the pipeline for one request; never raises a GatewayError."""
        in_flight = self._metrics.in_flight
        in_flight.count += 1
        try:
            return await self._handle(request)
        finally:
            in_flight.count -= 1

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        settings = self.settings  # one version for the whole request, even across a reload
        request_id = request_id_from(request.headers)
        raw_path, query = split_target(request.raw_path)
        if raw_path.startswith(("/.", "/%")) and is_gateway_path(raw_path):
            return await self._gateway_endpoint(request, settings, raw_path, query, started, request_id)
        outcome = Outcome()
        headers = request.headers
        decision: Decision | None = None
        try:
            if "Transfer-Encoding" in headers:
                refuse_transfer_codings(request)
            decision = await self.decider.decide(
                settings, request.method, raw_path, headers, preflight=True, count=True, peer=request.remote
            )
            error = decision.error
            if error is not None:
                raise error
            route = decision.route
            assert route is not None  # an allowed decision always has its route
            if decision.preflight is not None:
                decision.preflight["X-Request-Id"] = request_id
                self._record(request, started, raw_path, request_id, decision, 204, None, outcome)
                return web.Response(status=204, headers=decision.preflight)
            config = route.config
            upstream_headers = settings.headers.upstream_headers(
                headers,
                peer=request.remote,
                scheme=request.scheme,
                preserve_host=config.preserve_host,
                request_id=request_id,
                identity=decision.identity(),
            )
            if config.assertion and decision.principal is not None:
                upstream_headers[settings.headers.identity.assertion_header] = self._assertions.sign(
                    settings, decision, decision.upstream_path(), request_id
                )
            if decision.websocket:
                return await self._websocket(
                    request, settings, decision, upstream_headers, query, started, request_id, outcome
                )
            body_limit = config.max_body or settings.config.max_body
            refuse_oversized(request, body_limit)
            if headers.get("Expect", "").lower() == "100-continue" and request.writer is not None:
                # Only now, after authorisation and the length check, may the client send its body.
                await request.writer.write(_CONTINUE)
            cors = decision.cors
            response = await self._forwarder.forward(
                request,
                config,
                upstream_path=decision.upstream_path(),
                query=query,
                headers=upstream_headers,
                body_limit=body_limit,
                cors_headers=cors.response_headers(decision.origin) if cors is not None else None,
                rate_headers=decision.rate_headers,
                request_id=request_id,
                outcome=outcome,
                limits=settings.config.client,
            )
        except asyncio.CancelledError:
            if self._lifecycle.cutting:
                # The shutdown timeout passed with this request still running (README "Shutdown and drain").
                outcome.error = "shutdown"
                status = outcome.upstream_status or 503
                self._record(request, started, raw_path, request_id, decision, status, None, outcome)
            raise
        except GatewayError as error:
            response = refusal(error, request_id)
            if decision is not None:
                cors, origin = decision.cors, decision.origin
                if (
                    cors is not None
                    and origin is not None
                    and not isinstance(error, OriginNotAllowed)
                    and cors.allowed_on_route(origin, self._origins)
                ):
                    # So the page can read the JSON error instead of a bare CORS failure.
                    response.headers.update(cors.response_headers(origin))
            if request.body_exists and not request.content.is_eof():
                # An unread body must not be taken for the next request on this connection.
                response.force_close()
            self._record(
                request, started, raw_path, request_id, decision, response.status, error.refusal, outcome
            )
            return response
        self._record(request, started, raw_path, request_id, decision, response.status, None, outcome)
        return response

    async def _websocket(
        self,
        request: web.BaseRequest,
        settings: Settings,
        decision: Decision,
        headers: CIMultiDict[str],
        query: str,
        started: float,
        request_id: str,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """Relay an authorised WebSocket handshake; its line is written when the socket ends."""
        upstream_path = decision.upstream_path()
        cors = decision.cors
        response, ended = await self._websockets.open(
            request,
            decision,
            target=upstream_path + "?" + query if query else upstream_path,
            headers=headers,
            cors_headers=cors.response_headers(decision.origin) if cors is not None else None,
            request_id=request_id,
            outcome=outcome,
            limits=settings.config.client,
        )
        extra = None
        if ended is not None:
            outcome.error = ended.error
            extra = ended.fields()
        status = response.status
        path = decision.raw_path
        self._record(request, started, path, request_id, decision, status, None, outcome, extra=extra)
        return response

    async def _gateway_endpoint(
        self,
        request: web.BaseRequest,
        settings: Settings,
        raw_path: str,
        query: str,
        started: float,
        request_id: str,
    ) -> web.StreamResponse:
        """A path under /.gateway/: the gateway's own endpoints (never forwarded, never CORS)."""
        if raw_path in (TOKEN_PATH, JWKS_PATH):
            if raw_path == TOKEN_PATH:
                # The query string is refused, and never logged: it may hold a secret.
                issued = await self._tokens.exchange(request, settings, query, request_id)
            else:
                issued = self._tokens.jwks(request, settings)
            response = issued.response
            response.headers["X-Request-Id"] = request_id
            if request.body_exists and not request.content.is_eof():
                response.force_close()
            extra: dict[str, object] | None = None
            if issued.user is not None:
                extra = {"user": issued.user, "token_id": issued.key_id}
            status, error = response.status, issued.error
            self._record(request, started, raw_path, request_id, None, status, error, Outcome(), extra=extra)
            return response
        answer = await self._forward_auth.answer(request, settings, raw_path, request_id)
        if request.body_exists and not request.content.is_eof():
            answer.response.force_close()  # the body of a decision request is never read
        self._record(
            request,
            started,
            answer.path,
            request_id,
            answer.decision,
            answer.response.status,
            answer.error,
            Outcome(),
            method=answer.method,
        )
        return answer.response

    def record_listener_refusal(self, status: int, error: Refusal, request_id: str) -> None:
        """Count and log an answer the listener gave itself (a request the HTTP parser refused)."""
        self._metrics.requests.labels("", str(status)).inc()
        self._metrics.refusals.labels(error.value).inc()
        write_access(
            logging.ERROR if status >= 500 else logging.INFO,
            {
                "request_id": request_id,
                "method": None,
                "path": None,
                "route": None,
                "user": None,
                "token_id": None,
                "status": status,
                "upstream_status": None,
                "error": error.value,
                "duration_ms": 0.0,
            },
        )

    def _record(
        self,
        request: web.BaseRequest,
        started: float,
        raw_path: str,
        request_id: str,
        decision: Decision | None,
        status: int,
        error: Refusal | None,
        outcome: Outcome,
        *,
        method: str | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        route = decision.route if decision is not None else None
        principal = decision.principal if decision is not None else None
        route_name = route.config.name if route is not None else None
        metrics = self._metrics
        tally = metrics.tally
        label = route_name or ""
        tally.count(label, _STATUS_TEXT.get(status) or str(status))
        if error is not None:
            metrics.refusals.labels(error.value).inc()
            if error is Refusal.RATE_LIMITED:
                metrics.rate_limited.labels(label).inc()
        if outcome.upstream_seconds is not None and route_name is not None:
            tally.observe(tally.upstream, route_name, outcome.upstream_seconds)
        elapsed = time.perf_counter() - started
        if status != 101:  # a WebSocket's line comes when it ends: its lifetime is no request's duration
            tally.observe(tally.durations, label, elapsed)
        code = error.value if error is not None else outcome.error
        if outcome.client_gone:
            code = "client_disconnected"
        level = logging.ERROR if status >= 500 or outcome.error else logging.INFO
        line: dict[str, object] = {
            "request_id": request_id,
            "method": method or request.method,
            "path": printable(raw_path),
            "route": route_name,
            "user": principal.user if principal is not None else None,
            "token_id": principal.token_id if principal is not None else None,
            "status": status,
            "upstream_status": outcome.upstream_status,
            "error": code,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if extra is not None:
            line.update(extra)
        write_access(level, line)
