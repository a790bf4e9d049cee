"""A measuring stick for issue 16's choice of server side (bench row (f')): the bare proxy (e)
with aiohttp's web server replaced by a bare asyncio protocol on aiohttp's own C request
parser, writing each answer's head and body in one write.

It does what (e) does (a dict of tokens, hop-by-hop headers dropped, X-Service-User added,
the gateway's upstream client) and nothing a production server must: no header timer, no
connection cap, no 100-continue, no request bodies, no pipelined requests answered in
order. So it is an upper bound on what owning the server side could save, not a server.

    BENCH_BARE_TOKENS=SECRET=USER python -m bench.raw_proxy --listen 127.0.0.1:9100 \\
        --upstream http://127.0.0.1:9200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser
from multidict import CIMultiDict

from gateway.upstream import ConnectionPool, UpstreamClient

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_REFUSAL = b'{"error": "invalid_token"}'
UNAUTHORISED = (
    b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(_REFUSAL)
    + _REFUSAL
)


class RawProxy(BaseProtocol):
    """One client connection: parse with aiohttp's C parser, forward, answer in one write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokens: dict[str, str], pool: ConnectionPool) -> None:
        super().__init__(loop)
        self._loop = loop
        self._tokens = tokens
        self._pool = pool
        self._parser = HttpRequestParser(self, loop, 2**16, max_line_size=8190, max_field_size=8190)
        self._client = UpstreamClient()

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self._parser.feed_data(data)
        for message, _payload in messages:
            self._loop.create_task(self._answer(message))

    async def _answer(self, message: Any) -> None:
        transport = self.transport
        scheme, _, secret = message.headers.get("Authorization", "").partition(" ")
        user = self._tokens.get(secret) if scheme == "Bearer" else None
        if user is None:
            if transport is not None:
                transport.write(UNAUTHORISED)
            return
        headers = CIMultiDict((k, v) for k, v in message.headers.items() if k.lower() not in HOP_BY_HOP)
        headers.popall("Host", None)
        headers.popall("Authorization", None)
        headers["X-Service-User"] = user
        client, pool = self._client, self._pool
        upstream = await client.send(
            pool, message.method, message.path, headers, body=None, length=None, body_limit=0, timeout=60
        )
        try:
            body = b""
            while chunk := await upstream.content.readany():
                body += chunk
            lines = [f"HTTP/1.1 {upstream.status} {upstream.reason}"]
            lines += [f"{k}: {v}" for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
            if "Content-Length" not in upstream.headers:
                lines.append(f"Content-Length: {len(body)}")
            if transport is not None:
                transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        finally:
            upstream.release()


async def serve(listen: str, upstream: str, tokens: dict[str, str]) -> None:
    loop = asyncio.get_running_loop()
    pool = UpstreamClient().pool_for("raw", upstream.rstrip("/"), 100)
    host, _, port = listen.rpartition(":")
    server = await loop.create_server(
        lambda: RawProxy(loop, tokens, pool), host, int(port), reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", default="127.0.0.1:9100", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT")
    args = parser.parse_args()
    tokens = dict(pair.split("=", 1) for pair in os.environ.get("BENCH_BARE_TOKENS", "").split(",") if pair)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.upstream, tokens))


if __name__ == "__main__":
    main()
