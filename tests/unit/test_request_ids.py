"""Request ids (gateway.headers.new_request_id): 128 random bits, hex, never repeated, and a
forked worker never repeats its parent's (the ids come from a batch of CSPRNG bytes)."""

from __future__ import annotations

import os
import re

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import connection_named, new_request_id


def test_ids_are_32_hex_digits_and_unique_across_many_batches() -> None:
    ids = [new_request_id() for _ in range(20_000)]  # about eighty batches of 256
    assert all(re.fullmatch(r"[0-9a-f]{32}", one) for one in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_the_ids_its_parent_hands_out() -> None:
    new_request_id()  # a batch is loaded in the parent before the fork
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(writer, "".join(new_request_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader, "rb") as pipe:
        text = pipe.read().decode()
    child = {text[i : i + 32] for i in range(0, len(text), 32)}
    parent = {new_request_id() for _ in range(8)}
    assert len(child) == 8 and not child & parent


def test_connection_names_are_folded_and_cached_per_line_and_read_from_every_line() -> None:
    one = CIMultiDictProxy(CIMultiDict([("Connection", "keep-alive, X_Secret")]))
    assert connection_named(one) == frozenset({"keep-alive", "x-secret"})
    assert connection_named(one) is connection_named(one)  # one line: the cached set
    two = CIMultiDictProxy(CIMultiDict([("Connection", "close"), ("Connection", "X-Other")]))
    assert connection_named(two) == frozenset({"close", "x-other"})
