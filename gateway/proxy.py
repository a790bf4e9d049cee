"""The streaming forwarder: one upstream request per client request, bodies streamed both ways.

Imports: config, errors, headers, lifecycle, upstream, aiohttp.

Contract: `Forwarder.forward` is called only for an authorised request, with headers
already cleaned by `headers.HeaderPolicy`. It returns the prepared (and finished)
client response; it raises UpstreamError/UpstreamTimeout only while no byte of the
response has been sent. Once streaming has begun, a failure aborts the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.config import ClientLimits, RouteConfig
from gateway.errors import BadRequest, PayloadTooLarge, RequestTimeout
from gateway.headers import merge_vary, response_headers
from gateway.lifecycle import Lifecycle
from gateway.ratelimit import RateHeaders
from gateway.upstream import UpstreamClient, UpstreamResponse

log = logging.getLogger("gateway.proxy")

_BUFFERED_BODY = 64 * 1024  # bodies up to this size are read whole before going upstream
_RELAY_CHUNK = 64 * 1024  # the most of an answer handed to the client's transport at once
# Write-buffer size below which a write cannot wait for the client (asyncio's default
# high-water mark is 64 KiB; half of it leaves room for what aiohttp adds itself).
_UNTIMED_WRITE = 32 * 1024


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the access log."""

    upstream_status: int | None = None
    upstream_seconds: float | None = None  # from sending the request to its response headers
    error: str | None = None  # a refusal code when the stream broke after headers were sent
    client_gone: bool = False


class Forwarder:
    """Sends one authorised request upstream and streams the answer back."""

    def __init__(self, client: UpstreamClient, lifecycle: Lifecycle) -> None:
        self._client = client
        self._lifecycle = lifecycle

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
        rate_headers: RateHeaders = (),
        request_id: str,
        outcome: Outcome,
        limits: ClientLimits,
    ) -> web.StreamResponse:
        """Forward `request` to `route`'s upstream at `upstream_path` (already encoded);
        `rate_headers` are appended to the upstream's answer (after any of its own)."""
        target = upstream_path + "?" + query if query else upstream_path
        stream, length = _request_body(request, body_limit)
        body: StreamReader | bytes | None = stream
        if stream is not None and length is not None and length <= _BUFFERED_BODY:
            # Small bodies are read whole before an upstream connection is taken, so a
            # client sending them slowly holds no pool slot while it does (as nginx does).
            body = await _read_whole(stream, limits.body_timeout)
        pool = self._client.pool_for(route.name, route.upstream, route.max_connections, route.tls)
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
            body_timeout=limits.body_timeout,
        )
        outcome.upstream_status = upstream.status
        outcome.upstream_seconds = time.perf_counter() - sent
        try:
            return await self._relay(
                request, upstream, cors_headers, request_id, outcome, limits.send_timeout, rate_headers
            )
        finally:
            upstream.release()

    async def handshake(
        self,
        request: web.BaseRequest,
        route: RouteConfig,
        *,
        target: str,
        headers: CIMultiDict[str],
        cors_headers: dict[str, str] | None,
        rate_headers: RateHeaders = (),
        request_id: str,
        outcome: Outcome,
        limits: ClientLimits,
    ) -> UpstreamResponse | web.StreamResponse:
        """Send a WebSocket handshake upstream: its 101 (the caller owns the connection from
        then on), or any other answer already relayed to the client as plain HTTP."""
        pool = self._client.pool_for(route.name, route.upstream, route.max_connections, route.tls)
        sent = time.perf_counter()
        upstream = await self._client.send(
            pool,
            "GET",
            target,
            headers,
            body=None,
            length=None,
            body_limit=0,
            timeout=route.timeout,
            upgrade=True,
        )
        outcome.upstream_status = upstream.status
        outcome.upstream_seconds = time.perf_counter() - sent
        if upstream.status == 101:
            return upstream
        try:
            return await self._relay(
                request, upstream, cors_headers, request_id, outcome, limits.send_timeout, rate_headers
            )
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        cors_headers: dict[str, str] | None,
        request_id: str,
        outcome: Outcome,
        send_timeout: float,
        rate_headers: RateHeaders = (),
    ) -> web.StreamResponse:
        headers = response_headers(
            upstream.headers, drop_cors=cors_headers is not None, request_id=request_id
        )
        for name, value in rate_headers:
            headers.add(name, value)
        if cors_headers:
            for name, value in cors_headers.items():
                if name == "Vary" and "Vary" in headers:
                    # Every Vary line the upstream sent counts: a shared cache that lost one
                    # (Authorization, Cookie) could serve one user's answer to another.
                    value = merge_vary(headers.popall("Vary"), value)
                headers[name] = value
        response = _RelayedResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if self._lifecycle.draining:
            # Also for a request read before the shutdown signal (README "Shutdown and drain").
            response.force_close()
        transport = request.transport
        try:
            writer = await response.prepare(request)
            assert writer is not None  # a fresh response
            if request.method != "HEAD":
                content = upstream.content
                # The first read takes what is there (usually the whole answer, which then
                # leaves in one write with the head); later ones at most _RELAY_CHUNK: a client
                # that reads nothing would hold all of it while the parser reads on.
                chunk = content.read_nowait()
                if not chunk and not content.at_eof():
                    writer.send_headers()  # a slow answer's head is not held back for its body
                    chunk = await content.readany()
                while chunk:
                    # Below the write-buffer mark a write cannot wait: no timer for small answers.
                    size = len(chunk)
                    if transport is not None and transport.get_write_buffer_size() + size > _UNTIMED_WRITE:
                        async with _sending(send_timeout):
                            await response.write(chunk)
                    else:
                        await response.write(chunk)
                    chunk = await content.read(_RELAY_CHUNK)
            if transport is not None and transport.get_write_buffer_size() > _UNTIMED_WRITE:
                async with _sending(send_timeout):
                    await response.write_eof()
            else:
                await response.write_eof()
        except _ClientStalled:
            # The client stopped taking its answer: free the upstream connection and the
            # memory buffered for it instead of holding both for as long as it likes.
            outcome.error = "send_timeout"
            upstream.close()
            _abort(request)
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


class _RelayedResponse(web.StreamResponse):
    """A relayed answer whose head waits for its first body bytes (or its end), so that a
    small answer costs one write: aiohttp's own Response does the same."""

    _send_headers_immediately = False


class _ClientStalled(Exception):
    """The client took no byte of its response for `limits.send_timeout` seconds."""


@contextlib.asynccontextmanager
async def _sending(timeout: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:
        raise _ClientStalled from exc


async def _read_whole(body: StreamReader, timeout: float) -> bytes:
    """The whole of a small request body; RequestTimeout when the client pauses for `timeout` seconds."""
    parts: list[bytes] = []
    try:
        while True:
            async with asyncio.timeout(timeout):
                chunk = await body.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    except TimeoutError as exc:
        raise RequestTimeout(f"the request body paused for more than {timeout:g}s") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise BadRequest("the request body could not be read (connection closed or malformed)") from exc


def _abort(request: web.BaseRequest) -> None:
    # Headers are out: the only honest signal left is a truncated body and a closed connection.
    transport = request.transport
    if transport is not None:
        transport.close()


def refuse_transfer_codings(request: web.BaseRequest) -> None:
    """Raise BadRequest unless Transfer-Encoding is absent or exactly `chunked`.

    The parser only removes the chunked framing: any other transfer-coding (`gzip, chunked`)
    would be silently lost on the way upstream, so the body sent would not be the one framed.
    """
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and [c.strip().lower() for v in codings for c in v.split(",")] != ["chunked"]:
        raise BadRequest("a transfer-coding other than 'chunked' is not supported")


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
