"""`HeaderPolicy.client_address`: the client a request comes from, for per-address limits.

CONTRACT "Client address": the TCP peer; when the peer is in `trusted_proxies`, the right-most
`X-Forwarded-For` entry that is not in `trusted_proxies`. IPv6 addresses count per /64.
"""

from __future__ import annotations

import ipaddress

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import IdentityConfig
from gateway.headers import HeaderPolicy

TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))


def policy(*networks: str) -> HeaderPolicy:
    return HeaderPolicy(IdentityConfig(), tuple(ipaddress.ip_network(n) for n in networks) or TRUSTED)


def forwarded(*lines: str) -> CIMultiDictProxy[str]:
    """Request headers with one X-Forwarded-For line per argument (plus one unrelated header)."""
    headers: CIMultiDict[str] = CIMultiDict([("Host", "gw.test")])
    for line in lines:
        headers.add("X-Forwarded-For", line)
    return CIMultiDictProxy(headers)


def test_an_untrusted_peer_is_the_client_whatever_x_forwarded_for_says() -> None:
    headers = forwarded("198.51.100.1, 203.0.113.7")
    assert policy().client_address(headers, "192.0.2.10") == "192.0.2.10"
    assert policy().client_address(forwarded("127.0.0.1"), "192.0.2.10") == "192.0.2.10"
    # No trusted_proxies at all: even a loopback peer's X-Forwarded-For is ignored.
    nobody = HeaderPolicy(IdentityConfig(), ())
    assert nobody.client_address(headers, "127.0.0.1") == "127.0.0.1"
    assert nobody.client_address(forwarded(), None) == "unknown"


def test_a_trusted_peer_gives_the_right_most_untrusted_entry() -> None:
    p = policy()
    assert p.client_address(forwarded("203.0.113.7"), "127.0.0.1") == "203.0.113.7"
    # Entries left of the proxy's own are whatever the client wrote.
    assert p.client_address(forwarded("198.51.100.1, 203.0.113.7"), "127.0.0.1") == "203.0.113.7"
    assert p.client_address(forwarded(" 1.1.1.1 ,203.0.113.7 "), "127.0.0.1") == "203.0.113.7"
    # Trusted hops to the right are skipped, however many.
    chain = forwarded("198.51.100.1, 203.0.113.7, 10.1.2.3, 127.0.0.5")
    assert p.client_address(chain, "10.0.0.1") == "203.0.113.7"
    # A trusted peer that sent no X-Forwarded-For is itself the client.
    assert p.client_address(forwarded(), "127.0.0.1") == "127.0.0.1"


def test_several_x_forwarded_for_lines_are_one_list_in_order() -> None:
    p = policy()
    assert p.client_address(forwarded("198.51.100.1", "203.0.113.7"), "127.0.0.1") == "203.0.113.7"
    assert p.client_address(forwarded("198.51.100.1, 203.0.113.7", "10.0.0.9"), "127.0.0.1") == "203.0.113.7"
    assert p.client_address(forwarded("203.0.113.7", "198.51.100.1"), "127.0.0.1") == "198.51.100.1"


def test_an_empty_entry_is_not_a_way_around_the_limit() -> None:
    # An empty right-most entry (a proxy appending nothing) is a client named "unknown", not the
    # entry the client wrote to the left of it.
    assert policy().client_address(forwarded("203.0.113.7, "), "127.0.0.1") == "unknown"


def test_ipv6_clients_count_per_64() -> None:
    p = policy("127.0.0.0/8", "::1/128")
    one = p.client_address(forwarded("2001:db8:1:2:aaaa::1"), "127.0.0.1")
    assert one == "2001:db8:1:2::/64"
    assert p.client_address(forwarded("2001:db8:1:2:ffff:ffff:ffff:ffff"), "::1") == one
    assert p.client_address(forwarded("[2001:db8:1:2::7]"), "127.0.0.1") == one
    assert p.client_address(forwarded("2001:db8:1:3::1"), "127.0.0.1") == "2001:db8:1:3::/64"
    # The peer itself, untrusted, counts per /64 too.
    assert p.client_address(forwarded(), "2001:db8:1:2::99") == one
    assert p.client_address(forwarded("203.0.113.7"), "2001:db8:1:2::99") == one


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("::ffff:cb00:7107", "203.0.113.7"),
        ("203.0.113.7", "203.0.113.7"),
    ],
)
def test_an_ipv4_mapped_ipv6_address_is_its_ipv4_client(entry: str, expected: str) -> None:
    p = policy()
    assert p.client_address(forwarded(entry), "127.0.0.1") == expected
    assert p.client_address(forwarded(), entry) == expected  # as the peer itself


def test_an_entry_is_cut_short() -> None:
    long = "a" * 500
    assert policy().client_address(forwarded(long), "127.0.0.1") == "a" * 64


def test_a_port_added_by_the_balancer_is_not_part_of_the_address() -> None:
    balancer = policy("10.0.0.0/8")
    for entry, expected in (
        ("203.0.113.7:5678", "203.0.113.7"),
        ("[2001:db8::1]:443", "2001:db8::/64"),
        ("203.0.113.7", "203.0.113.7"),
    ):
        assert balancer.client_address(forwarded(entry), "10.0.0.1") == expected
