"""Listening sockets for `serve --workers N`: one SO_REUSEPORT socket per worker, one port."""

from __future__ import annotations

import socket

import pytest

from gateway.errors import ConfigError
from gateway.server import _bind_proxies


def test_one_worker_gets_one_plain_socket() -> None:
    (sock,) = _bind_proxies(("127.0.0.1", 0), 1)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        sock.close()


def test_workers_get_their_own_socket_on_the_same_port() -> None:
    socks = _bind_proxies(("127.0.0.1", 0), 3)
    try:
        ports = {sock.getsockname()[1] for sock in socks}
        assert len(socks) == 3 and len(ports) == 1 and 0 not in ports
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1 for sock in socks)
        # Every socket takes connections: the kernel spreads them by address hash.
        port = ports.pop()
        accepted = [0, 0, 0]
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(0.05)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        for index, sock in enumerate(socks):
            while True:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    break
                conn.close()
                accepted[index] += 1
        for client in clients:
            client.close()
        assert sum(accepted) == 60
        assert all(count > 0 for count in accepted), accepted
    finally:
        for sock in socks:
            sock.close()


def test_a_taken_port_is_a_config_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            _bind_proxies(("127.0.0.1", holder.getsockname()[1]), 2)
    finally:
        holder.close()
