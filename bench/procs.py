"""Processes of a benchmark run: started and stopped by PID, sampled through /proc.

Every process the bench starts goes through `Processes.start`, which remembers it;
`Processes.stop_all` (called from a `finally`) ends each one by its own PID, so a run
that fails or is interrupted leaves nothing behind.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of `pid` (clock ticks), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    return sum(int(value) for value in fields[11:15])


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def child_pids(pid: int) -> list[int]:
    """The live direct children of `pid` (a supervisor's workers), sorted."""
    return sorted(_children_by_parent().get(pid, []))


def tree_cpu_ticks(pid: int) -> int:
    """`cpu_ticks` of `pid` plus those of its live descendants (worker processes, if any).

    A child that exited and was waited for is already in its parent's cutime/cstime.
    """
    children = _children_by_parent()
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_ticks(current)
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total


def core_ticks(core: int | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks of one core (`None`: all cores) since boot, from /proc/stat.

    Busy is user+nice+system+steal (time the hypervisor gave to someone else counts as
    taken); total adds idle, iowait, irq and softirq. Interrupt time is left out of busy
    because it is not charged to any process, and on loopback much of it is the
    measured traffic's own packet processing.
    """
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
            busy = user + nice + system + steal
            return busy, busy + idle + iowait + irq + softirq
    raise RuntimeError(f"no {name} line in /proc/stat")


def wait_until_quiet(threshold: float, max_wait: float, window: float = 1.0) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until the machine's CPU use over `window` s is below `threshold`.

    Other people's processes share this machine; this only avoids starting a measurement in
    the middle of their burst. Returns (seconds waited, last busy fraction seen).
    """
    started = time.monotonic()
    busy_fraction = 1.0
    while True:
        busy0, total0 = core_ticks()
        time.sleep(window)
        busy1, total1 = core_ticks()
        busy_fraction = (busy1 - busy0) / max(1, total1 - total0)
        waited = time.monotonic() - started
        if busy_fraction < threshold or waited >= max_wait:
            return waited, busy_fraction


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM, …) in KiB; 0 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples VmRSS of one process every `interval` seconds in a thread; `peak_kib` is the maximum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = status_kib(self.pid, "VmRSS")
            except OSError:
                return
            self.peak_kib = max(self.peak_kib, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Proc:
    """One started process: its name, argv, log file and Popen handle."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Starts processes (stdout+stderr to a log file, never an undrained pipe) and stops them by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], *, cpus: str | None = None, cwd: Path | None = None) -> Proc:
        """Start `argv` (pinned with `taskset -c CPUS` when given); its output goes to LOG_DIR/NAME.log."""
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=cwd,
            )
        except BaseException:
            log.close()
            raise
        log.close()  # the child holds its own descriptor
        proc = Proc(name, argv, log_path, popen)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal `proc` by its PID, wait for it (SIGKILL after `timeout`); return its exit code."""
        if proc.popen.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        if proc in self.running:
            self.running.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(list(self.running)):
            self.stop(proc)


def wait_port(port: int, proc: Proc, timeout: float = 20.0) -> None:
    """Wait until 127.0.0.1:`port` accepts connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not listening on {port} after {timeout}s:\n{proc.log_tail()}")


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until GET `url` answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback URL we built)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: {url} not ready after {timeout}s:\n{proc.log_tail()}")


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0, cafile: Path | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET to a loopback URL: (status, headers, body); HTTP errors are returned, not raised.

    `cafile`: an https URL is verified against this certificate (the bench's self-signed one).
    """
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (loopback URL we built)
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def tls_probe(port: int, cafile: Path) -> str:
    """The protocol and cipher a default client (OpenSSL's defaults, as wrk's) gets from 127.0.0.1:`port`."""
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"
