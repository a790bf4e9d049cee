"""The WebSocket scenario's load client: N sockets, each doing send → receive round trips.

Each socket sends a small binary message, waits for its echo, checks it byte for byte and
starts the next one at once (closed loop, one message in flight per socket), for a warm-up
and then a measured window. wrk cannot speak WebSocket, hence this aiohttp client (on
uvloop, pinned by the caller to the load core like wrk).

The window's boundaries are taken here, not by the caller: the server's CPU time
(`/proc/PID/stat` of `--server-pid` and its children) and the busy time of the server's
core and of the load core are read at the start and the end of the measured window, so the
connects, the warm-up and the closing handshakes are not charged to the round trips.

    BENCH_WS_TOKEN=gw_… python -m bench.ws_load --url ws://127.0.0.1:8080/ws/echo \\
        --sockets 50 --warmup 2 --duration 8 --server-pid 1234 --sut-core 1 --load-core 0

It prints one line, `WS_JSON {…}`, that bench/load.py parses. Every wait is bounded: a
receive that takes more than `--receive-timeout` seconds ends that socket (counted as an
error), and the whole run is cut after warm-up + duration + 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSMsgType

from bench.procs import core_ticks, tree_cpu_ticks

TOKEN_ENV = "BENCH_WS_TOKEN"  # noqa: S105 (a variable name; the token travels in the environment)


@dataclass
class Window:
    """Shared by the sockets: whether round trips count now, and whether to stop."""

    recording: bool = False
    stopping: bool = False
    samples: list[int] = field(default_factory=list)  # round-trip times, ns, in the window
    errors: list[str] = field(default_factory=list)


async def pinger(
    socket: aiohttp.ClientWebSocketResponse, payload: bytes, window: Window, receive_timeout: float
) -> None:
    """Round trips on one socket until `window.stopping`; a wrong answer or a timeout ends it."""
    clock = time.perf_counter_ns
    samples = window.samples
    while not window.stopping:
        started = clock()
        await socket.send_bytes(payload)
        try:
            message = await socket.receive(timeout=receive_timeout)
        except TimeoutError:
            window.errors.append(f"no echo within {receive_timeout:g} s")
            return
        elapsed = clock() - started
        if message.type is not WSMsgType.BINARY or message.data != payload:
            window.errors.append(f"unexpected message {message.type.name}")
            return
        if window.recording:
            samples.append(elapsed)


def _percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None:
        return None
    return (after[0] - before[0]) / max(1, after[1] - before[1])


async def run(args: argparse.Namespace, token: str) -> dict[str, object]:
    """Connect, warm up, measure, close; the figures of the measured window."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    payload = os.urandom(args.size)
    window = Window()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = await asyncio.gather(
            *(session.ws_connect(args.url, headers=headers, compress=0) for _ in range(args.sockets))
        )
        try:
            tasks = [
                asyncio.create_task(pinger(socket, payload, window, args.receive_timeout))
                for socket in sockets
            ]
            await asyncio.sleep(args.warmup)
            server0 = tree_cpu_ticks(args.server_pid) if args.server_pid else None
            sut0 = core_ticks(args.sut_core) if args.sut_core is not None else None
            load0 = core_ticks(args.load_core) if args.load_core is not None else None
            own0 = time.process_time()
            started = time.monotonic()
            window.recording = True
            await asyncio.sleep(args.duration)
            window.recording = False
            elapsed = time.monotonic() - started
            own1 = time.process_time()
            server1 = tree_cpu_ticks(args.server_pid) if args.server_pid else None
            sut1 = core_ticks(args.sut_core) if args.sut_core is not None else None
            load1 = core_ticks(args.load_core) if args.load_core is not None else None
            window.stopping = True
            _, pending = await asyncio.wait(tasks, timeout=args.receive_timeout + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    window.errors.append(f"{task.exception().__class__.__name__}: {task.exception()}")
        finally:
            for socket in sockets:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await socket.close()
    ordered = sorted(window.samples)
    count = len(ordered)
    return {
        "sockets": args.sockets,
        "size": args.size,
        "round_trips": count,
        "duration_s": elapsed,
        "lat_mean_us": (sum(ordered) / count / 1000) if count else 0.0,
        "lat_p50_us": _percentile(ordered, 0.50) / 1000,
        "lat_p90_us": _percentile(ordered, 0.90) / 1000,
        "lat_p99_us": _percentile(ordered, 0.99) / 1000,
        "lat_max_us": (ordered[-1] / 1000) if count else 0.0,
        "errors": len(window.errors),
        "first_error": window.errors[0] if window.errors else "",
        "server_ticks": None if server0 is None or server1 is None else server1 - server0,
        "sut_core_busy_ticks": None if sut0 is None or sut1 is None else sut1[0] - sut0[0],
        "sut_core_total_ticks": None if sut0 is None or sut1 is None else sut1[1] - sut0[1],
        "load_core_busy": _busy(load0, load1),
        "client_cpu": (own1 - own0) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/PATH")
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="bytes per binary message")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of round trips not counted")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured")
    parser.add_argument("--receive-timeout", type=float, default=5.0)
    parser.add_argument("--server-pid", type=int, help="charge this process tree's CPU to the window")
    parser.add_argument("--sut-core", type=int, help="the server's core, for 'others on core N'")
    parser.add_argument("--load-core", type=int, help="the load core, to see whether it was saturated")
    args = parser.parse_args()
    token = os.environ.get(TOKEN_ENV, "")
    coroutine = run(args, token)
    limit = args.warmup + args.duration + 30

    async def bounded() -> dict[str, object]:
        async with asyncio.timeout(limit):
            return await coroutine

    try:
        import uvloop
    except ImportError:
        result = asyncio.run(bounded())
    else:
        result = uvloop.run(bounded())
    print("WS_JSON " + json.dumps(result), flush=True)


async def sanity(url: str, token: str, expect_user: str | None) -> None:
    """One socket: a binary and a text echo, and (through the gateway) the identity the
    upstream saw on its handshake; RuntimeError when anything differs."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with asyncio.timeout(15), aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers) as socket:
            await socket.send_bytes(b"\x00\x01bench\xff")
            binary = await socket.receive(timeout=5)
            await socket.send_str("héllo")
            text = await socket.receive(timeout=5)
            await socket.send_str("?user")
            user = await socket.receive(timeout=5)
    if binary.type is not WSMsgType.BINARY or binary.data != b"\x00\x01bench\xff":
        raise RuntimeError(f"WebSocket sanity check of {url}: binary echo {binary.type.name} {binary.data!r}")
    if text.type is not WSMsgType.TEXT or text.data != "héllo":
        raise RuntimeError(f"WebSocket sanity check of {url}: text echo {text.type.name} {text.data!r}")
    if expect_user is not None and user.data != expect_user:
        raise RuntimeError(f"WebSocket sanity check of {url}: the upstream saw X-Service-User {user.data!r}")


if __name__ == "__main__":
    main()
