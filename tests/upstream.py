"""A real upstream for tests: an aiohttp app on loopback that echoes what it received.

Behaviour is chosen by query parameters (the query is forwarded unchanged):
`status=N`, `delay=S` (before headers), `bytes=N` (stream N bytes back), `stall=S`
(send headers and one chunk, then stall), `hold=S` (send headers alone, then the body
`late` after S seconds), `cors=1` (send its own CORS headers),
`cookie=1` (Set-Cookie).
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web

CHUNK = b"x" * 65536


async def handle(request: web.Request) -> web.StreamResponse:
    query = request.query
    received: list[web.Request] = request.app[SEEN]
    received.append(request)
    if "delay" in query:
        await asyncio.sleep(float(query["delay"]))
    if "bytes" in query:
        total = int(query["bytes"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = total
        await response.prepare(request)
        sent = 0
        while sent < total:
            piece = CHUNK[: min(len(CHUNK), total - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response
    if "hold" in query:
        response = web.StreamResponse()
        response.content_length = 4
        await response.prepare(request)  # the head leaves now, alone
        await asyncio.sleep(float(query["hold"]))
        await response.write(b"late")
        await response.write_eof()
        return response
    if "stall" in query:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first chunk;")
        await asyncio.sleep(float(query["stall"]))
        await response.write(b"too late")
        await response.write_eof()
        return response
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    headers: dict[str, str] = {}
    if "cors" in query:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Allow-Credentials"] = "true"
    response = web.json_response(
        {
            "method": request.method,
            "raw_path": request.raw_path.partition("?")[0],
            "query": request.raw_path.partition("?")[2],
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        },
        status=int(query.get("status", "200")),
        headers=headers,
    )
    if "cookie" in query:
        response.set_cookie("upstream_session", "abc")
    return response


SEEN = web.AppKey("seen", list)


def build_upstream() -> web.Application:
    app = web.Application(client_max_size=2**40)
    app[SEEN] = []
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def header_values(echo: dict[str, object], name: str) -> list[str]:
    """All values the upstream received for header `name` (case-insensitive)."""
    pairs = echo["headers"]
    assert isinstance(pairs, list)
    return [v for k, v in pairs if k.lower() == name.lower()]
