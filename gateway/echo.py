"""A demo upstream that answers every request with what it received, as JSON.

Imports: aiohttp only. Run with `gateway demo-upstream`; the shipped gateway.yaml points
its routes here so the README walkthrough works on a bare machine.
"""

from __future__ import annotations

import hashlib

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    """Answer with the method, path, query, headers and body size the upstream saw."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.partition("?")[0],
            "query": request.query_string,
            "headers": dict(request.headers),
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }
    )


def build_echo_app() -> web.Application:
    """The echo application (every path, every method)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def run_echo(host: str, port: int) -> None:
    """Serve the echo upstream until interrupted."""
    web.run_app(build_echo_app(), host=host, port=port, access_log=None, print=None)
