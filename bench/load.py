"""Load generators: wrk for request rates and latency, curl for the streaming runs, and
bench/ws_load.py for WebSocket round trips."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import CLK_TCK, RssSampler, core_ticks, status_kib, tree_cpu_ticks
from bench.servers import REPO
from bench.ws_load import TOKEN_ENV

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"


def shown(argv: list[str], secret: str, name: str = "TOKEN") -> str:
    """`argv` as a shell command, with the secret replaced by $NAME (never written to RESULTS.md).

    `name`: the variable the report's commands use for this kind of secret ($TOKEN for a
    `gw_` token, $KEY_SECRET for an API key's secret, $ACCESS_TOKEN for a JWT).
    """
    text = shlex.join(argv)
    return text.replace(secret, f"${name}") if secret else text


@dataclass
class WrkResult:
    """One wrk run against one server, plus that server's CPU time over the run."""

    connections: int
    requests: int
    duration_s: float
    rps: float
    lat_mean_ms: float
    lat_p50_ms: float
    lat_p90_ms: float
    lat_p99_ms: float
    lat_max_ms: float
    errors: dict[str, int]
    cpu_us_per_req: float | None
    cpu_util: float | None
    """Server CPU seconds per wall second over the run (1.0 = one core busy)."""
    others_on_sut_core: float | None = None
    """Share of the server's core used by anything but the server during the run (0..1)."""
    settle: str = ""
    command: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    token: str = "",
    shown_as: str = "TOKEN",
    cpus: str = "0",
    server_pid: int | None = None,
    sut_core: int | None = None,
    load_core: int | None = None,
    timeout_s: int = 5,
) -> WrkResult:
    """`taskset -c CPUS wrk -t1 -cN -dDs --latency` (+ the Authorization header when `token`).

    `shown_as`: the variable name the recorded command shows instead of the token (see `shown`).

    `load_core`: also record how busy wrk's core was (`raw["load_core_busy"]`, 0..1): with
    TLS wrk encrypts too, and a saturated load core means the server had time to spare.
    """
    argv = [
        "taskset",
        "-c",
        cpus,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout_s}s",
    ]
    argv += ["--latency", "-s", str(WRK_SCRIPT)]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    argv.append(url)
    before = tree_cpu_ticks(server_pid) if server_pid else None
    core_before = core_ticks(sut_core) if sut_core is not None else None
    load_before = core_ticks(load_core) if load_core is not None else None
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    wall = time.monotonic() - started
    after = tree_cpu_ticks(server_pid) if server_pid else None
    core_after = core_ticks(sut_core) if sut_core is not None else None
    load_after = core_ticks(load_core) if load_core is not None else None
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no WRK_JSON line:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    if load_before is not None and load_after is not None:
        raw["load_core_busy"] = (load_after[0] - load_before[0]) / max(1, load_after[1] - load_before[1])
    requests = int(raw["requests"])
    duration_s = raw["duration_us"] / 1e6
    cpu_us: float | None = None
    util: float | None = None
    if before is not None and after is not None:
        cpu_s = (after - before) / CLK_TCK
        cpu_us = cpu_s * 1e6 / requests if requests else None
        util = cpu_s / wall
    others: float | None = None
    if core_before is not None and core_after is not None:
        core_busy = core_after[0] - core_before[0]
        core_total = max(1, core_after[1] - core_before[1])
        server_ticks = (after - before) if after is not None and before is not None else 0
        others = max(0.0, (core_busy - server_ticks) / core_total)
    return WrkResult(
        connections=connections,
        requests=requests,
        duration_s=duration_s,
        rps=requests / duration_s if duration_s else 0.0,
        lat_mean_ms=raw["lat_mean_us"] / 1000,
        lat_p50_ms=raw["lat_p50_us"] / 1000,
        lat_p90_ms=raw["lat_p90_us"] / 1000,
        lat_p99_ms=raw["lat_p99_us"] / 1000,
        lat_max_ms=raw["lat_max_us"] / 1000,
        errors={
            key: int(raw[key])
            for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        },
        cpu_us_per_req=cpu_us,
        cpu_util=util,
        others_on_sut_core=others,
        command=shown(argv, token, shown_as),
        raw=raw,
    )


def run_ws_load(
    url: str,
    *,
    sockets: int,
    duration: float,
    warmup: float,
    env: dict[str, str],
    token: str = "",
    size: int = 64,
    cpus: str = "0",
    server_pid: int | None = None,
    sut_core: int | None = None,
    load_core: int | None = None,
) -> WrkResult:
    """`taskset -c CPUS python -m bench.ws_load …`: WebSocket round trips, as a WrkResult.

    The record is wrk's, a request being one round trip (send a message, receive its echo),
    so the rounds, medians and table rows of the HTTP runs apply unchanged. The client
    reads the server's CPU time itself at the edges of its measured window; `raw` keeps
    its own CPU use (`client_cpu`) and that of the load core (`load_core_busy`), which say
    whether the client side was the limit.
    """
    argv = ["taskset", "-c", cpus, sys.executable, "-m", "bench.ws_load", "--url", url]
    argv += ["--sockets", str(sockets), "--size", str(size)]
    argv += ["--warmup", f"{warmup:g}", "--duration", f"{duration:g}"]
    if server_pid is not None:
        argv += ["--server-pid", str(server_pid)]
    if sut_core is not None:
        argv += ["--sut-core", str(sut_core)]
    if load_core is not None:
        argv += ["--load-core", str(load_core)]
    child_env = dict(env)
    if token:
        child_env[TOKEN_ENV] = token
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=child_env,
        cwd=REPO,
        timeout=warmup + duration + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ws_load failed ({done.returncode}): {done.stderr[-2000:] or done.stdout}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("WS_JSON ")), None)
    if line is None:
        raise RuntimeError(f"ws_load printed no WS_JSON line:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WS_JSON "))
    count = int(raw["round_trips"])
    seconds = float(raw["duration_s"])
    ticks = raw["server_ticks"]
    cpu_us = ticks / CLK_TCK * 1e6 / count if ticks is not None and count else None
    util = ticks / CLK_TCK / seconds if ticks is not None and seconds else None
    others: float | None = None
    if raw["sut_core_busy_ticks"] is not None:
        others = max(0.0, (raw["sut_core_busy_ticks"] - (ticks or 0)) / max(1, raw["sut_core_total_ticks"]))
    shown_command = shlex.join(argv)
    if token:
        shown_command = f"{TOKEN_ENV}=$TOKEN {shown_command}"
    return WrkResult(
        connections=sockets,
        requests=count,
        duration_s=seconds,
        rps=count / seconds if seconds else 0.0,
        lat_mean_ms=raw["lat_mean_us"] / 1000,
        lat_p50_ms=raw["lat_p50_us"] / 1000,
        lat_p90_ms=raw["lat_p90_us"] / 1000,
        lat_p99_ms=raw["lat_p99_us"] / 1000,
        lat_max_ms=raw["lat_max_us"] / 1000,
        errors={"ws_errors": int(raw["errors"])},
        cpu_us_per_req=cpu_us,
        cpu_util=util,
        others_on_sut_core=others,
        command=shown_command,
        raw=raw,
    )


@dataclass
class StreamResult:
    """One streamed transfer through the gateway."""

    direction: str
    bytes: int
    seconds: float
    mb_per_s: float
    http_code: int
    peak_rss_mb: float
    baseline_rss_mb: float
    hwm_mb: float
    rss_samples: int
    gateway_cpu_util: float
    """Gateway CPU seconds per wall second during the transfer."""
    others_on_sut_core: float | None
    command: str


def run_curl_stream(
    direction: str,
    url: str,
    *,
    token: str,
    size: int,
    gateway_pid: int,
    cpus: str,
    upload_file: Path | None = None,
    sut_core: int | None = None,
    max_time: int = 300,
) -> StreamResult:
    """Download to /dev/null or upload a (sparse) file with curl, sampling the gateway's VmRSS."""
    answer = None if upload_file is None else upload_file.with_suffix(".response.json")
    sink = "/dev/null" if answer is None or direction == "download" else str(answer)
    argv = ["taskset", "-c", cpus, "curl", "-sS", "--max-time", str(max_time), "-o", sink]
    argv += ["-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    argv += ["-H", f"Authorization: Bearer {token}"]
    if direction == "upload":
        assert upload_file is not None
        argv += ["-X", "POST", "-H", "Content-Type: application/octet-stream", "-T", str(upload_file)]
    argv.append(url)
    baseline = status_kib(gateway_pid, "VmRSS")
    ticks = tree_cpu_ticks(gateway_pid)
    core_before = core_ticks(sut_core) if sut_core is not None else None
    started = time.monotonic()
    with RssSampler(gateway_pid, 0.05) as sampler:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max_time + 30, check=False)
    server_ticks = tree_cpu_ticks(gateway_pid) - ticks
    util = server_ticks / CLK_TCK / (time.monotonic() - started)
    others: float | None = None
    if core_before is not None:
        core_after = core_ticks(sut_core)
        others = max(
            0.0, (core_after[0] - core_before[0] - server_ticks) / max(1, core_after[1] - core_before[1])
        )
    hwm = status_kib(gateway_pid, "VmHWM")
    if done.returncode != 0:
        raise RuntimeError(f"curl {direction} failed ({done.returncode}): {done.stderr}")
    code, down, up, total = done.stdout.split()
    moved = int(float(down if direction == "download" else up))
    seconds = float(total)
    if moved != size or code != "200":
        raise RuntimeError(f"curl {direction}: moved {moved} bytes, expected {size} (HTTP {code})")
    if direction == "upload" and answer is not None:
        received = json.loads(answer.read_text())["received"]
        if received != size:
            raise RuntimeError(f"upload: the upstream received {received} bytes, expected {size}")
    return StreamResult(
        direction=direction,
        bytes=moved,
        seconds=seconds,
        mb_per_s=moved / seconds / 1e6,
        http_code=int(code),
        peak_rss_mb=sampler.peak_kib * 1024 / 1e6,
        baseline_rss_mb=baseline * 1024 / 1e6,
        hwm_mb=hwm * 1024 / 1e6,
        rss_samples=sampler.samples,
        gateway_cpu_util=util,
        others_on_sut_core=others,
        command=shown(argv, token),
    )
