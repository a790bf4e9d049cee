"""The WebSocket scenario's upstream: an aiohttp echo server.

Every text or binary message goes back unchanged, as the same type, so the load client
(bench/ws_load.py) can time round trips and check each answer. One text message is not
echoed: `?user` is answered with the `X-Service-User` the handshake carried (empty when
none), so a sanity check can see that the gateway attached the identity to its own
handshake with the upstream. The load sends binary messages only, which never hit that
branch.

    python -m bench.ws_upstream --listen 127.0.0.1:9400
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aiohttp import WSMsgType, web

WHO = "?user"


async def echo(request: web.Request) -> web.WebSocketResponse:
    # No compression (the gateway offers no extension anyway) and aiohttp's own ping/pong.
    socket = web.WebSocketResponse(compress=False, max_msg_size=4 * 1024 * 1024)
    await socket.prepare(request)
    user = request.headers.get("X-Service-User", "")
    async for message in socket:
        if message.type is WSMsgType.BINARY:
            await socket.send_bytes(message.data)
        elif message.type is WSMsgType.TEXT:
            await socket.send_str(user if message.data == WHO else message.data)
        else:
            break
    return socket


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:9400", help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
