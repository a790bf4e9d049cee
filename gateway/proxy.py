"""The streaming forwarder: one upstream request per client request, bodies streamed both ways.

Imports: config, errors, headers, upstream, aiohttp.

Contract: `Forwarder.forward` is called only for an authorised request, with headers
already cleaned by `headers.HeaderPolicy`. It returns the prepared (and finished)
client response; it raises UpstreamError/UpstreamTimeout only while no byte of the
response has been sent. Once streaming has begun, a failure aborts the connection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.config import RouteConfig
from gateway.errors import PayloadTooLarge
from gateway.headers import response_headers
from gateway.upstream import UpstreamClient, UpstreamResponse

log = logging.getLogger("gateway.proxy")


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the access log."""

    upstream_status: int | None = None
    upstream_seconds: float | None = None  # from sending the request to its response headers
    error: str | None = None  # a refusal code when the stream broke after headers were sent
    client_gone: bool = False


class Forwarder:
    """Sends one authorised request upstream and streams the answer back."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    async def forward(
        self,
        request: web.BaseRequest,
        route: RouteConfig,
        *,
        upstream_path: str,
        query: str,
        headers: CIMultiDict[str],
        body_limit: int,
        cors_headers: dict[str, str] | None,
        request_id: str,
        outcome: Outcome,
    ) -> web.StreamResponse:
        """Forward `request` to `route`'s upstream at `upstream_path` (already encoded)."""
        target = upstream_path + "?" + query if query else upstream_path
        body, length = _request_body(request, body_limit)
        pool = self._client.pool_for(route.name, route.upstream, route.max_connections)
        sent = time.perf_counter()
        upstream = await self._client.send(
            pool,
            request.method,
            target,
            headers,
            body=body,
            length=length,
            body_limit=body_limit,
            timeout=route.timeout,
        )
        outcome.upstream_status = upstream.status
        outcome.upstream_seconds = time.perf_counter() - sent
        try:
            return await self._relay(request, upstream, cors_headers, request_id, outcome)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        cors_headers: dict[str, str] | None,
        request_id: str,
        outcome: Outcome,
    ) -> web.StreamResponse:
        headers = response_headers(
            upstream.headers, drop_cors=cors_headers is not None, request_id=request_id
        )
        if cors_headers:
            for name, value in cors_headers.items():
                if name == "Vary" and "Vary" in headers:
                    value = f"{headers['Vary']}, {value}"
                headers[name] = value
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                content = upstream.content
                while chunk := await content.readany():
                    await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The client went away: stop reading the upstream quietly.
            outcome.client_gone = True
            upstream.close()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            outcome.error = "upstream_timeout"
            upstream.close()
            _abort(request)
        except (aiohttp.ClientError, OSError):
            outcome.error = "upstream_unavailable"
            upstream.close()
            _abort(request)
        return response


def _abort(request: web.BaseRequest) -> None:
    # Headers are out: the only honest signal left is a truncated body and a closed connection.
    transport = request.transport
    if transport is not None:
        transport.close()


def refuse_oversized(request: web.BaseRequest, limit: int) -> None:
    """Raise PayloadTooLarge when the declared Content-Length is over `limit` (before any 100 Continue)."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit}")


def _request_body(request: web.BaseRequest, limit: int) -> tuple[StreamReader | None, int | None]:
    """The client's body and its length (None: unknown, sent chunked and counted against `limit`)."""
    if not request.body_exists:
        return None, None
    refuse_oversized(request, limit)
    # With a length, the HTTP parser already holds the client to exactly that many bytes.
    return request.content, request.content_length
