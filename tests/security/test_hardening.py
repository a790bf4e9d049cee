"""Regression tests for the hardening review (README "Request framing", "Headers", "Slow clients").

Each test drives the real gateway (proxy listener built as `gateway serve` builds it) in front
of a raw upstream on loopback, so the exact bytes both sides saw are checked: parser refusals
that quoted the request back, upstream heads with control characters or bare LF line ends,
headers upstream frameworks act on, TRACE/CONNECT, Vary merging, the Server header, and
clients that stall the head, the body or the response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tests.integration.test_upstream_client import Exchange, ok, until
from tests.security.test_upstream_framing import (
    PUBLIC_POLICIES,
    error_code,
    read_response,
    report_body,
    serving,
    status_of,
)


async def raw_exchange(port: int, raw: bytes, timeout: float = 5.0) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()


def header_lines(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.split(b":", 1)[0].strip().lower() == name.lower()
    ]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.msg for r in caplog.records if r.name == "gateway.access" and isinstance(r.msg, dict)]


# Item 7: parser-level refusals never quote the request, and are logged and counted.


@pytest.mark.parametrize(
    "line",
    [
        b"Authorization: Bearer TOKEN\x01\r\n",
        b"Authorization: Bearer TOKEN\rX\r\n",
        b"Authorization: Bearer TOKEN" + b"A" * 8200 + b"\r\n",
    ],
    ids=["control-char", "bare-cr", "over-8190"],
)
async def test_parser_refusals_never_quote_the_token(
    tmp_path: Path, line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, report_body) as (upstream, proxy, gateway):
        token = proxy.headers["Authorization"].split()[1].encode()
        raw = b"GET /echo/a HTTP/1.1\r\nHost: gw.test\r\n" + line.replace(b"TOKEN", token) + b"\r\n"
        with caplog.at_level(logging.INFO):
            head, body = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 400, head
        assert token not in head + body
        assert error_code(body) == "bad_request"
        assert header_lines(head, b"X-Request-Id")
        assert upstream.exchanges == []
        [record] = [line for line in access_lines(caplog) if line.get("status") == 400]
        assert record["error"] == "bad_request"
        assert token.decode() not in caplog.text
        assert 'gateway_refusals_total{reason="bad_request"} 1.0' in gateway.metrics.render().decode()


async def test_bare_lf_request_head_is_not_echoed(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body) as (upstream, proxy, _):
        token = proxy.headers["Authorization"].split()[1].encode()
        raw = b"GET /echo/a HTTP/1.1\nHost: gw.test\nAuthorization: Bearer " + token + b"\x01\n\n"
        head, body = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 400
        assert token not in head + body and b"Host" not in body


# Item 8: upstream heads with control characters or bare LF line ends are a 502.


def answering_with(head: bytes) -> object:
    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(head + b"Content-Length: 2\r\n\r\nok")
        return False

    return respond


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\n",
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\n",
        b"HTTP/1.1 200 O\x01K\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: injected=1\r\n",
        b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\n",
    ],
    ids=["value-ctl", "value-del", "reason-ctl", "bare-lf-inside", "bare-lf-only"],
)
async def test_malformed_upstream_head_is_a_json_502(
    tmp_path: Path, head: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(tmp_path, answering_with(head)) as (_, proxy, _gateway):
        with caplog.at_level(logging.INFO):
            response = await proxy.request("GET", "/echo/a")
            body = await response.json()
        assert response.status == 502 and body["error"] == "upstream_unavailable", body
        assert response.headers.get("X-Request-Id")
        assert "Set-Cookie" not in response.headers and "X-Bad" not in response.headers
        assert [line["status"] for line in access_lines(caplog)] == [502]
        # The gateway keeps serving on a fresh connection.
        assert (await proxy.request("GET", "/echo/a")).status == 502


async def test_bare_lf_in_a_response_body_is_relayed(tmp_path: Path) -> None:
    """Only heads are checked: a body may hold any byte."""

    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(b"line one\nline two\n\n"))
        return True

    async with serving(tmp_path, respond) as (_, proxy, _gateway):
        for _ in range(2):  # the second on the pooled connection
            response = await proxy.request("GET", "/echo/a")
            assert (response.status, await response.read()) == (200, b"line one\nline two\n\n")


async def test_early_hints_then_final_head_pass_the_line_check(tmp_path: Path) -> None:
    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
        writer.write(ok(b"final"))
        return True

    async with serving(tmp_path, respond) as (_, proxy, _gateway):
        response = await proxy.request("GET", "/echo/a")
        assert (response.status, await response.read()) == (200, b"final")


# Item 9: headers that upstream frameworks act on never pass; TRACE and CONNECT are refused.

DROPPED = [
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Client-IP",
    "True-Client-IP",
    "X-Forwarded-Server",
    "X_Forwarded_For",
    "X.Forwarded.Host",
    "Content_Length",
    "Transfer_Encoding",
    "X_Request_Id",
]


async def test_reinterpreted_and_respelt_headers_are_dropped(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body) as (upstream, proxy, _):
        extra = "".join(f"{name}: 1\r\n" for name in DROPPED)
        raw = (
            f"GET /echo/a HTTP/1.1\r\nHost: gw.test\r\nAuthorization: {proxy.headers['Authorization']}\r\n"
            f"X-Kept: yes\r\n{extra}\r\n"
        ).encode()
        head, _ = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 200, head
        [exchange] = upstream.exchanges
        names = {name.lower() for name, _ in exchange.headers}
        assert "x-kept" in names
        for name in DROPPED:
            assert name.lower() not in names, name
        assert exchange.values("X-Forwarded-For") == ["127.0.0.1"]


async def test_every_connection_line_counts(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body) as (upstream, proxy, _):
        raw = (
            f"GET /echo/a HTTP/1.1\r\nHost: gw.test\r\nAuthorization: {proxy.headers['Authorization']}\r\n"
            "Connection: keep-alive\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\n\r\n"
        ).encode()
        head, _ = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 200, head
        [exchange] = upstream.exchanges
        assert exchange.values("X-Secret-Hop") == []


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
async def test_trace_and_connect_are_405(tmp_path: Path, method: str) -> None:
    async with serving(tmp_path, report_body) as (upstream, proxy, _):
        target = "gw.test:443" if method == "CONNECT" else "/echo/a"
        raw = (
            f"{method} {target} HTTP/1.1\r\nHost: gw.test\r\n"
            f"Authorization: {proxy.headers['Authorization']}\r\n\r\n"
        ).encode()
        head, body = await raw_exchange(proxy.client.port, raw)
        assert status_of(head) == 405, head
        assert error_code(body) == "method_not_allowed"
        [allow] = header_lines(head, b"Allow")
        assert b"GET" in allow and b"TRACE" not in allow and b"CONNECT" not in allow
        assert upstream.exchanges == []


async def test_connect_is_decided_by_rules_when_a_rule_names_it(tmp_path: Path) -> None:
    policies = PUBLIC_POLICIES.replace(
        "  echo:\n    rules:\n",
        "  echo:\n    rules:\n"
        '      - methods: [CONNECT]\n        paths: ["/echo/tunnel"]\n        require: "echo:write"\n',
        1,
    )
    async with serving(tmp_path, report_body, policies=policies) as (upstream, proxy, gateway):
        assert gateway.pipeline.settings.connect_allowed
        raw = b"CONNECT /echo/tunnel HTTP/1.1\r\nHost: gw.test\r\n\r\n"
        head, body = await raw_exchange(proxy.client.port, raw)
        assert (status_of(head), error_code(body)) == (401, "missing_token")


# Item 5: every Vary line of the upstream survives on a cors route.


async def test_vary_lines_are_merged_with_origin(tmp_path: Path) -> None:
    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(b"{}", "Vary: Cookie", "Vary: Authorization, accept-encoding"))
        return True

    async with serving(tmp_path, respond, cors='{origins: ["https://app.example"]}') as (_, proxy, _g):
        response = await proxy.client.get(
            "/echo/a", headers={**proxy.headers, "Origin": "https://app.example"}
        )
        assert response.status == 200
        assert response.headers.getall("Vary") == ["Cookie, Authorization, accept-encoding, Origin"]
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"


# Item 12: no Server header naming Python or aiohttp.


async def test_no_server_header_names_python_or_aiohttp(tmp_path: Path) -> None:
    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        server = ("Server: Python/3.11 aiohttp/3.14.5",) if exchange.target == "/echo/named" else ()
        writer.write(ok(b"plain", *server))
        return True

    async with serving(tmp_path, respond) as (_, proxy, _g):
        named = await proxy.request("GET", "/echo/named")
        assert named.headers.getall("Server") == ["gateway"]
        relayed = await proxy.request("GET", "/echo/a")
        refused = await proxy.client.get("/echo/a")
        missing = await proxy.client.get("/nowhere")
        for response in (relayed, refused, missing):
            server = response.headers.get("Server", "")
            assert "python" not in server.lower() and "aiohttp" not in server.lower(), server


# Item 3: slow clients.


async def test_a_head_sent_too_slowly_is_cut(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body, limits="header_timeout: 0.3") as (upstream, proxy, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        started = time.monotonic()
        try:
            writer.write(b"GET /echo/a HTTP/1.1\r\n")
            for _ in range(20):
                await asyncio.sleep(0.1)
                writer.write(b"X-Drip: 1\r\n")
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            data = b""
        finally:
            writer.close()
        assert data == b""
        assert time.monotonic() - started < 0.3 + 2.0 + 1.0
        assert upstream.exchanges == []


async def test_an_idle_new_connection_is_cut_after_the_header_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body, limits="header_timeout: 0.3") as (_, proxy, _g):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 2.0
        writer.close()


async def test_a_stalled_streamed_body_is_408_and_frees_the_pool_slot(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body, max_connections=1, limits="body_timeout: 0.5") as (
        upstream,
        proxy,
        _,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            writer.write(
                f"POST /echo/slow HTTP/1.1\r\nHost: gw.test\r\n"
                f"Authorization: {proxy.headers['Authorization']}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode()
            )
            await writer.drain()
            await until(lambda: len(upstream.exchanges) == 1)
            # The slot is held while the body streams; the stalled client loses it.
            head, body = await read_response(reader, 5)
            assert (status_of(head), error_code(body)) == (408, "request_timeout")
        finally:
            writer.close()
        response = await proxy.request("GET", "/echo/next")
        assert response.status == 200


async def test_a_slowly_sent_small_body_holds_no_pool_slot(tmp_path: Path) -> None:
    """max_connections 1: a public POST dribbled byte by byte must not hold the route's only
    upstream connection (the body is read whole first), so an authorised request passes meanwhile."""
    async with serving(tmp_path, report_body, policies=PUBLIC_POLICIES, max_connections=1, timeout=1) as (
        upstream,
        proxy,
        _,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
        try:
            writer.write(b"POST /echo/hook HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 20\r\n\r\n")
            for _ in range(5):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
            response = await proxy.request("GET", "/echo/other")
            assert response.status == 200
            writer.write(b"y" * 15)
            head, body = await read_response(reader, 5)
            assert (status_of(head), body) == (200, b"received 20")
        finally:
            writer.close()
        assert [exchange.line for exchange in upstream.exchanges] == [
            "GET /echo/other HTTP/1.1",
            "POST /echo/hook HTTP/1.1",
        ]


async def test_a_client_that_stops_reading_frees_the_upstream(tmp_path: Path) -> None:
    big = b"b" * (8 * 1024 * 1024)

    async def respond(exchange: Exchange, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(big if exchange.target == "/echo/big" else b"small"))
        return True

    async with serving(tmp_path, respond, max_connections=1, timeout=5, limits="send_timeout: 0.5") as (
        upstream,
        proxy,
        gateway,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port, limit=4096)
        try:
            writer.write(
                f"GET /echo/big HTTP/1.1\r\nHost: gw.test\r\n"
                f"Authorization: {proxy.headers['Authorization']}\r\n\r\n".encode()
            )
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
            # Never read further: after send_timeout the gateway gives the upstream slot back.
            started = time.monotonic()
            response = await proxy.request("GET", "/echo/small")
            assert (response.status, await response.read()) == (200, b"small")
            assert time.monotonic() - started < 0.5 + 3.0
        finally:
            writer.close()


async def test_connections_over_the_cap_get_503_overloaded(tmp_path: Path) -> None:
    async with serving(tmp_path, report_body, limits="max_connections: 3") as (_, proxy, gateway):
        assert gateway.connections.limit == 3
        held = [await asyncio.open_connection("127.0.0.1", proxy.client.port) for _ in range(3)]
        try:
            await until(lambda: gateway.connections.open == 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
            head, body = await read_response(reader, 5)
            writer.close()
            assert (status_of(head), error_code(body)) == (503, "overloaded")
            assert header_lines(head, b"Retry-After") == [b"1"]
        finally:
            for _, w in held:
                w.close()
        await until(lambda: gateway.connections.open == 0)
        response = await proxy.request("GET", "/echo/a")
        assert (response.status, await response.read()) == (200, b"received 0")
