"""Where an upstream URL points, and the Host header the gateway sends for it."""

from __future__ import annotations

import pytest

from gateway.upstream import Endpoint


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "host_header", "base"),
    [
        ("http://api.internal", "api.internal", 80, False, "api.internal", ""),
        ("http://api.internal:80/v1", "api.internal", 80, False, "api.internal", "/v1"),
        ("https://api.internal:443", "api.internal", 443, True, "api.internal", ""),
        ("https://api.internal", "api.internal", 443, True, "api.internal", ""),
        ("http://127.0.0.1:8080/base/path", "127.0.0.1", 8080, False, "127.0.0.1:8080", "/base/path"),
        ("http://[::1]:80", "::1", 80, False, "[::1]", ""),
        ("http://[::1]:9000", "::1", 9000, False, "[::1]:9000", ""),
        ("https://api.internal:80", "api.internal", 80, True, "api.internal:80", ""),
    ],
)
def test_endpoint_parse(url: str, host: str, port: int, tls: bool, host_header: str, base: str) -> None:
    assert Endpoint.parse(url) == Endpoint(host, port, tls, host_header, base)
