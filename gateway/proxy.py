"""The streaming forwarder: one upstream connection pool per route, bodies streamed both ways.

Imports: config, errors, headers, aiohttp.

Contract: `Forwarder.forward` is called only for an authorised request, with headers
already cleaned by `headers.HeaderPolicy`. It returns the prepared (and finished)
client response; it raises UpstreamError/UpstreamTimeout only while no byte of the
response has been sent. Once streaming has begun, a failure aborts the connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import RouteConfig
from gateway.errors import PayloadTooLarge, UpstreamError, UpstreamTimeout
from gateway.headers import response_headers

log = logging.getLogger("gateway.proxy")

_CHUNK = 256 * 1024
# The client's own headers are forwarded; aiohttp must not add its defaults
# (Accept-Encoding: gzip with auto_decompress off would hand gzip to clients that never asked).
_SKIP_AUTO = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(slots=True)
class Outcome:
    """What happened upstream, for the access log."""

    upstream_status: int | None = None
    upstream_seconds: float | None = None  # from sending the request to its response headers
    error: str | None = None  # a refusal code when the stream broke after headers were sent
    client_gone: bool = False


class UpstreamPools:
    """One ClientSession (its own connector) per (upstream, pool size), shared by every request.

    Separate pools per route keep a route full of long downloads from starving the others.
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}

    def session_for(self, route: RouteConfig) -> aiohttp.ClientSession:
        """The pooled session for `route` (created on first use)."""
        key = (route.upstream, route.max_connections)
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=route.max_connections,
                limit_per_host=0,
                keepalive_timeout=30,
                ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                # A shared jar would hand one client's upstream cookies to the next client.
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=_SKIP_AUTO,
                trust_env=False,
                requote_redirect_url=False,
                read_bufsize=_CHUNK,
            )
            self._sessions[key] = session
        return session

    async def close(self) -> None:
        """Close every pool (at shutdown)."""
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            await session.close()


class Forwarder:
    """Sends one authorised request upstream and streams the answer back."""

    def __init__(self, pools: UpstreamPools) -> None:
        self._pools = pools

    async def forward(
        self,
        request: web.Request,
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
        target = route.upstream + upstream_path
        if query:
            target += "?" + query
        url = URL(target, encoded=True)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(route.timeout, 10.0), sock_read=route.timeout
        )
        body, limited = _request_body(request, body_limit)
        session = self._pools.session_for(route)
        sent = time.perf_counter()
        try:
            upstream = await session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            _raise_if_too_large(limited, exc)
            raise UpstreamTimeout(f"upstream did not answer within {route.timeout:g}s") from exc
        except (aiohttp.ClientError, OSError, PayloadTooLarge) as exc:
            _raise_if_too_large(limited, exc)
            raise UpstreamError("upstream refused or broke the connection") from exc
        outcome.upstream_status = upstream.status
        outcome.upstream_seconds = time.perf_counter() - sent
        try:
            return await self._relay(request, upstream, cors_headers, request_id, outcome)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
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
                async for chunk in upstream.content.iter_chunked(_CHUNK):
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


def _raise_if_too_large(limited: _LimitedBody | None, exc: BaseException) -> None:
    if limited is not None and limited.exceeded:
        raise PayloadTooLarge(f"request body is larger than the limit of {limited.limit} bytes") from exc


def _abort(request: web.Request) -> None:
    # Headers are out: the only honest signal left is a truncated body and a closed connection.
    transport = request.transport
    if transport is not None:
        transport.close()


class _LimitedBody:
    """The client's body as an async iterator that stops at `limit` bytes (unknown length)."""

    def __init__(self, request: web.Request, limit: int) -> None:
        self._request = request
        self.limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._request.content.iter_any():
            received += len(chunk)
            if received > self.limit:
                self.exceeded = True
                raise PayloadTooLarge(f"request body is larger than the limit of {self.limit} bytes")
            yield chunk


def _request_body(request: web.Request, limit: int) -> tuple[object, _LimitedBody | None]:
    """The body to send upstream, and the counter watching it where its length is unknown."""
    if not request.body_exists:
        return None, None
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit}")
        # The HTTP parser already holds the client to exactly Content-Length bytes.
        return request.content, None
    limited = _LimitedBody(request, limit)
    return limited.__aiter__(), limited
