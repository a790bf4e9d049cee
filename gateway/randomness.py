"""Random bytes for per-request ids (request ids, assertion `jti`s), from the OS's CSPRNG.

Imports: nothing of the gateway.

`os.urandom` is one getrandom() system call; called for each request it was one syscall in
eight on the proxy path. These bytes are read 4 KiB at a time and handed out in order, each
byte once, and a forked child (a `--workers` worker) starts on a fresh read, never on bytes
its parent hands out too.
"""

from __future__ import annotations

import os

_BATCH = 4096


class _Pool:
    __slots__ = ("_bytes", "_at")

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        at = self._at
        if at + count > len(self._bytes):
            self._bytes, at = os.urandom(max(_BATCH, count)), 0
        self._at = at + count
        return self._bytes[at : at + count]

    def forget(self) -> None:
        self._bytes, self._at = b"", 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def random_bytes(count: int) -> bytes:
    """`count` bytes from the OS's CSPRNG, never handed out twice (nor again in a forked child)."""
    return _POOL.take(count)
