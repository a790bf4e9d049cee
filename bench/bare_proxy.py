"""The bench's yardstick (d): a bare streaming aiohttp reverse proxy.

A dict of tokens, no policy, no logging, no metrics: the least an aiohttp proxy that
checks a bearer token and streams the answer back can do. Tokens come from the
environment, `BENCH_BARE_TOKENS="SECRET=USER[,SECRET=USER…]"`.

    python -m bench.bare_proxy --listen 127.0.0.1:9100 --upstream http://127.0.0.1:9200

`--client gateway` swaps aiohttp.ClientSession for the gateway's own upstream client
(gateway/upstream.py) and changes nothing else: the bench's (e), which isolates what
that client saves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.upstream import UpstreamClient

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
TOKENS = web.AppKey("tokens", dict)
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
LEAN = web.AppKey("lean", UpstreamClient)


async def handle(request: web.Request) -> web.StreamResponse:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    user = request.app[TOKENS].get(secret) if scheme == "Bearer" else None
    if user is None:
        return web.json_response({"error": "invalid_token"}, status=401)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.pop("Host", None)
    headers.pop("Authorization", None)
    headers["X-Service-User"] = user
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def handle_lean(request: web.Request) -> web.StreamResponse:
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    user = request.app[TOKENS].get(secret) if scheme == "Bearer" else None
    if user is None:
        return web.json_response({"error": "invalid_token"}, status=401)
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
    headers.popall("Host", None)
    headers.popall("Authorization", None)
    headers["X-Service-User"] = user
    client = request.app[LEAN]
    upstream = await client.send(
        client.pool_for("bare", request.app[UPSTREAM], 100),
        request.method,
        request.raw_path,
        headers,
        body=request.content if request.body_exists else None,
        length=request.content_length,
        body_limit=2**40,
        timeout=60,
    )
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        await response.prepare(request)
        while chunk := await upstream.content.readany():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def lean_context(app: web.Application) -> AsyncIterator[None]:
    client = UpstreamClient()
    app[LEAN] = client
    yield
    await client.close()


async def session_context(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=100)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def build_app(upstream: str, tokens: dict[str, str], client: str = "aiohttp") -> web.Application:
    app = web.Application(client_max_size=2**40)
    app[TOKENS] = tokens
    app[UPSTREAM] = upstream.rstrip("/")
    if client == "gateway":
        app.cleanup_ctx.append(lean_context)
        app.router.add_route("*", "/{tail:.*}", handle_lean)
    else:
        app.cleanup_ctx.append(session_context)
        app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:9100", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT")
    parser.add_argument(
        "--client",
        choices=("aiohttp", "gateway"),
        default="aiohttp",
        help="the upstream client (default aiohttp)",
    )
    args = parser.parse_args()
    tokens = dict(pair.split("=", 1) for pair in os.environ.get("BENCH_BARE_TOKENS", "").split(",") if pair)
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(ImportError):  # the same event loop as `gateway serve`
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(
        build_app(args.upstream, tokens, args.client), host=host, port=int(port), access_log=None, print=None
    )


if __name__ == "__main__":
    main()
