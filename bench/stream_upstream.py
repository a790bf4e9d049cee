"""The streaming scenario's upstream: a small aiohttp app.

- `GET /…?bytes=N` streams N bytes (with Content-Length) in 256 KiB writes of one
  preallocated buffer, so the upstream itself costs little CPU;
- `POST|PUT /…` reads the whole body as it arrives, keeps nothing, and answers
  `{"received": N}`.

    python -m bench.stream_upstream --listen 127.0.0.1:9300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aiohttp import web

CHUNK = b"\0" * (256 * 1024)


async def download(request: web.Request) -> web.StreamResponse:
    total = int(request.query.get("bytes", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    view = memoryview(CHUNK)
    sent = 0
    while sent < total:
        piece = view[: min(len(CHUNK), total - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"received": received})


def build_app() -> web.Application:
    app = web.Application(client_max_size=2**40)
    app.router.add_route("GET", "/{tail:.*}", download)
    app.router.add_route("POST", "/{tail:.*}", upload)
    app.router.add_route("PUT", "/{tail:.*}", upload)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:9300", help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
