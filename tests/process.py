"""Run `gateway serve` as a real subprocess (for memory, signal and multi-process tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config import load_config

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid` (a supervisor's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


async def until_listening(
    port: int, process: subprocess.Popen[bytes], logs: Callable[[], str], within: float
) -> None:
    """Poll 127.0.0.1:`port` until it accepts a connection; fail at once when `process` exits,
    and after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited early ({process.returncode}):\n{logs()}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    pytest.fail(f"{process.args!r} not listening on {port} within {within:g}s:\n{logs()}")


def stop_process(process: subprocess.Popen[bytes], within: float) -> None:
    """SIGTERM `process`, SIGKILL it when it has not exited within `within` seconds, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=within)


async def writer_token(config: Path, user: str = "svc") -> str:
    """Create `user` (role writer) and a token for it in the store of `config`; the secret."""
    gateway = await Gateway.open(load_config(config, env={}))
    try:
        await gateway.directory.create_user(user, actor="test", roles=["writer"])
        _, token = await gateway.directory.create_token(user, "t", actor="test")
        return token
    finally:
        await gateway.close()


@contextlib.asynccontextmanager
async def serving(config: Path, **options: Any) -> AsyncIterator[tuple[GatewayProcess, str]]:
    """A ready `gateway serve` child on `config` (GatewayProcess `options`) and a writer token."""
    token = await writer_token(config)
    process = GatewayProcess(config, **options)
    try:
        await process.wait_ready()
        yield process, token
    finally:
        process.stop()


def _quick_stop(config: Path) -> None:
    """Give a config without a `shutdown` block a drain delay of 0, so the many tests that stop
    a process do not each wait the production default (5 s); drain tests set their own."""
    text = config.read_text()
    if not any(line.startswith("shutdown:") for line in text.splitlines()):
        config.write_text(text.rstrip("\n") + "\nshutdown: {drain_delay: 0, timeout: 10}\n")


def _confine(open_files: int | None, cpus: set[int] | None) -> None:
    if open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


class GatewayProcess:
    """A `gateway serve` child process with its own ports; stop() ends it."""

    def __init__(
        self,
        config: Path,
        *,
        extra_env: dict[str, str] | None = None,
        workers: int | str = 1,
        open_files: int | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        """Start the child; `open_files` caps its RLIMIT_NOFILE (soft and hard), `cpus` pins it
        (its affinity mask, as taskset would)."""
        self.config = config
        _quick_stop(config)
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.log_path = config.parent / f"gateway-{self.proxy_port}.log"
        env = {
            **os.environ,
            # The code under test is this checkout's, even where an older copy is installed.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "GATEWAY_PROXY_LISTEN": f"127.0.0.1:{self.proxy_port}",
            "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            **(extra_env or {}),
        }
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--workers", str(workers)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
            preexec_fn=None if open_files is None and cpus is None else lambda: _confine(open_files, cpus),
        )

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited early:\n{self.logs()}")
                try:
                    async with session.get(self.admin + "/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.logs()}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
