"""Per-stage profile of the request path: µs of the gateway's CPU per request, stage by stage.

    python -m bench.profile [--seconds 6] [--rounds 3] [--rate 1000] [--label TEXT]
                            [--variants token,jwt,assertion,ratelimit] [--no-write] [--keep]

The setup is the throughput scenario's (bench/run.py): the nginx upstream and wrk on core 0,
`gateway serve` (SQLite, log_level info, the `bench` route's policy and identity headers) on
core 1, 50 connections; one process per variant (token; JWT, on the token's process;
`assertion: true`; rate limits on the memory store), all started at once. Each variant's CPU
µs per request (the process's utime+stime over the requests served) is the median of ROUNDS
plain wrk runs that alternate between the variants; then one run per variant under `py-spy
record` (core 0, sampling the gateway's Python stacks) gives the shares. A sample's
stage is that of its deepest frame a rule below names; a stage's µs per request is its share
of the samples times the plain run's CPU per request. Samples where the interpreter waits in
the event loop's C code (epoll, socket reads and writes, uvloop's callbacks) are the
"event loop and syscalls" row. Threads other than the main one are left out: the only one is
aiosqlite's worker, which runs store reads (none per request on a cache hit) and which
py-spy counts as busy while it blocks on its queue.

The table goes into bench/RESULTS.md between PROFILE_BEGIN and PROFILE_END (bench/report.py
carries it over when a full run rewrites the file); the newest KEEP tables are kept, so a
change's "before" and "after" stand side by side. Needs py-spy (`pip install py-spy`), nginx
and wrk; every process is stopped by PID; traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.load import run_wrk
from bench.procs import LOOPBACK, Processes, free_port, wait_until_quiet
from bench.servers import (
    BENCH_PATH,
    REPO,
    GatewaySetup,
    Server,
    create_bench_key,
    create_bench_token,
    exchange_api_key,
    start_gateway,
    start_nginx_upstream,
    write_gateway_config,
)

RESULTS = REPO / "bench" / "RESULTS.md"
PROFILE_BEGIN = "<!-- profile:begin -->"
PROFILE_END = "<!-- profile:end -->"
KEEP = 4  # tables kept in RESULTS.md, newest first
LOAD_CPUS, SUT_CPUS = "0", "1"
CONNECTIONS = 50

# (stage, file glob, function glob): a sample belongs to the stage of its deepest frame that
# matches a rule (first matching rule wins for that frame). Files are as py-spy prints them
# (relative to their sys.path entry: gateway/headers.py, aiohttp/web_protocol.py).
RULES: tuple[tuple[str, str, str], ...] = (
    ("parse (HTTP parser, request object)", "aiohttp/web_protocol.py", "*.data_received"),
    ("parse (HTTP parser, request object)", "aiohttp/http_parser.py", "*"),
    ("parse (HTTP parser, request object)", "aiohttp/web_request.py", "*"),
    ("parse (HTTP parser, request object)", "aiohttp/web_server.py", "*"),
    ("parse (HTTP parser, request object)", "gateway/listener.py", "*"),
    ("parse (HTTP parser, request object)", "multidict/*", "*"),
    ("route + canonical path", "gateway/paths.py", "*"),
    ("route + canonical path", "gateway/decision.py", "resolve"),
    ("route + canonical path", "gateway/decision.py", "strip_prefix"),
    ("route + canonical path", "gateway/decision.py", "is_gateway_path"),
    ("route + canonical path", "gateway/decision.py", "Decision.upstream_path"),
    ("route + canonical path", "gateway/policy.py", "RouteTable.*"),
    ("authorisation", "gateway/policy.py", "*"),
    ("authorisation", "gateway/decision.py", "authorize"),
    ("authentication (cache hit)", "gateway/auth.py", "*"),
    ("authentication (cache hit)", "gateway/bearer.py", "*"),
    ("authentication (cache hit)", "gateway/tokens.py", "*"),
    ("authentication (cache hit)", "gateway/access_tokens.py", "*"),
    ("authentication (cache hit)", "gateway/jwt*.py", "*"),
    ("authentication (cache hit)", "cachetools/*", "*"),
    ("rate limits", "gateway/limiter.py", "*"),
    ("rate limits", "gateway/ratelimit.py", "*"),
    ("rate limits", "gateway/redis_client.py", "*"),
    ("assertion signing", "gateway/assertion.py", "*"),
    ("assertion signing", "gateway/signing.py", "*"),
    ("assertion signing", "jwt/*", "*"),
    ("assertion signing", "cryptography/*", "*"),
    ("origin (CORS)", "gateway/cors.py", "*"),
    ("header mutation", "gateway/headers.py", "*"),
    ("upstream write (pool, request head)", "gateway/upstream.py", "UpstreamClient.send"),
    ("upstream write (pool, request head)", "gateway/upstream.py", "_request_head*"),
    ("upstream write (pool, request head)", "gateway/upstream.py", "ConnectionPool.*"),
    ("upstream write (pool, request head)", "gateway/upstream.py", "Connection.prepare"),
    ("upstream read (response head, body)", "gateway/upstream.py", "*"),
    ("upstream read (response head, body)", "aiohttp/client_proto.py", "*"),
    ("upstream read (response head, body)", "aiohttp/streams.py", "*"),
    ("response write", "aiohttp/web_response.py", "*"),
    ("response write", "aiohttp/http_writer.py", "*"),
    ("response write", "gateway/proxy.py", "Forwarder._relay"),
    ("access log", "gateway/logs.py", "*"),
    ("access log", "logging/*", "*"),
    ("metrics", "prometheus_client/*", "*"),
    ("metrics", "gateway/metrics.py", "*"),
    ("metrics", "gateway/pipeline.py", "Pipeline._record"),
    ("decision and pipeline (the rest of their own code)", "gateway/decision.py", "*"),
    ("decision and pipeline (the rest of their own code)", "gateway/pipeline.py", "*"),
    ("decision and pipeline (the rest of their own code)", "gateway/proxy.py", "*"),
    ("aiohttp's handler loop and tasks", "aiohttp/web_protocol.py", "*"),
    ("aiohttp's handler loop and tasks", "asyncio/*", "*"),
)
LOOP = "event loop and syscalls (uvloop's C code)"
OTHER = "other"
STAGES = list(dict.fromkeys([stage for stage, _, _ in RULES] + [LOOP, OTHER]))
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


@dataclass
class Variant:
    """One configuration measured: its key, label and how a request is authenticated."""

    key: str
    label: str
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (CPU µs per request, req/s)
    samples: int = 0
    stages: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def cpu_us(self) -> float:
        """CPU µs per request of the median round (by CPU)."""
        return self._median()[0]

    @property
    def rps(self) -> float:
        """req/s of that same round."""
        return self._median()[1]

    def _median(self) -> tuple[float, float]:
        ordered = sorted(self.rounds)
        return ordered[len(ordered) // 2] if ordered else (0.0, 0.0)


def stage_of(stack: list[str]) -> str:
    """The stage of one sampled stack (root first), by its deepest frame a rule names."""
    for frame in reversed(stack):
        match = _FRAME.match(frame)
        if match is None:
            continue
        function, file = match["function"], match["file"]
        for stage, file_glob, function_glob in RULES:
            if fnmatch.fnmatchcase(file, file_glob) and fnmatch.fnmatchcase(function, function_glob):
                return stage
    return OTHER


def read_samples(raw: Path) -> collections.Counter[str]:
    """Samples per stage from py-spy's raw (collapsed-stack) output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap "):
            continue  # aiosqlite's worker: py-spy counts its blocking queue read as busy
        leaf = frames[-1]
        # The event loop's own C code shows as the sample sitting in Runner.run itself.
        if leaf.startswith(("Runner.run (asyncio/runners.py", "run_until_complete")):
            counts[LOOP] += int(number)
        else:
            counts[stage_of(frames)] += int(number)
    return counts


def log(message: str) -> None:
    print(f"[profile {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


class Profiler:
    def __init__(self, seconds: float, rate: int, work: Path, env: dict[str, str]) -> None:
        self.seconds, self.rate, self.work, self.env = seconds, rate, work, env
        self.procs = Processes(work, env)
        self.py_spy = shutil.which("py-spy") or "py-spy"

    def cpu_round(self, variant: Variant, server: Server, token: str) -> None:
        """One plain wrk run: the CPU per request (no profiler attached)."""
        url = f"http://{LOOPBACK}:{server.port}{BENCH_PATH}"
        wait_until_quiet(0.25, 20)
        plain = run_wrk(
            url,
            connections=CONNECTIONS,
            duration=self.seconds,
            token=token,
            cpus=LOAD_CPUS,
            server_pid=server.pid,
        )
        if plain.error_count or plain.cpu_us_per_req is None:
            raise RuntimeError(f"{variant.key}: wrk errors {plain.errors}")
        variant.rounds.append((plain.cpu_us_per_req, plain.rps))

    def sample(self, variant: Variant, server: Server, token: str) -> None:
        """The stage shares: a wrk run under `py-spy record`."""
        url = f"http://{LOOPBACK}:{server.port}{BENCH_PATH}"
        raw = self.work / f"{variant.key}.raw.txt"
        argv = ["taskset", "-c", LOAD_CPUS, self.py_spy, "record", "--pid", str(server.pid)]
        argv += [
            "--rate",
            str(self.rate),
            "--duration",
            f"{self.seconds:g}",
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attached before the load starts
        run_wrk(url, connections=CONNECTIONS, duration=self.seconds, token=token, cpus=LOAD_CPUS)
        _, err = spy.communicate(timeout=self.seconds + 60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
        counts = read_samples(raw)
        variant.samples = sum(counts.values())
        variant.stages = dict(counts)
        summary = f"{variant.rps:,.0f} req/s, {variant.cpu_us:.0f} µs CPU/req, {variant.samples} samples"
        log(f"{variant.key}: {summary}")

    def run(self, keys: list[str], rounds: int) -> list[Variant]:
        """Start every variant's server, measure their CPU in interleaved rounds, then sample each."""
        upstream_port = free_port()
        start_nginx_upstream(self.procs, self.work, LOAD_CPUS, upstream_port)
        upstream = f"http://{LOOPBACK}:{upstream_port}"
        store = f"sqlite+aiosqlite:///{self.work / 'gw-token' / 'gateway.db'}"
        base = write_gateway_config(self.work / "gw-token", store, upstream, upstream)
        token = create_bench_token(base, self.env)
        gateway = start_gateway(self.procs, base, SUT_CPUS, "gw-token")
        secret_file = base.directory / "gateway.secret"
        measured: list[tuple[Variant, Server, str]] = []
        for key in keys:
            if key == "token":
                measured.append((Variant(key, "token (c)"), gateway, token))
            elif key == "jwt":
                create_bench_key(base, self.env)
                measured.append((Variant(key, "JWT (j)"), gateway, exchange_api_key(base).token))
            else:
                setup = self._variant_setup(key, store, upstream, secret_file)
                label = {"assertion": "assertion (k)", "ratelimit": "rate limits, memory (l)"}[key]
                measured.append(
                    (Variant(key, label), start_gateway(self.procs, setup, SUT_CPUS, f"gw-{key}"), token)
                )
        for _, server, credential in measured:  # warm-up: caches filled, code paths run
            url = f"http://{LOOPBACK}:{server.port}{BENCH_PATH}"
            run_wrk(url, connections=CONNECTIONS, duration=2, token=credential, cpus=LOAD_CPUS)
        for round_no in range(rounds):
            for variant, server, credential in measured:
                self.cpu_round(variant, server, credential)
            log(f"round {round_no + 1}/{rounds} done")
        for variant, server, credential in measured:
            self.sample(variant, server, credential)
        return [variant for variant, _, _ in measured]

    def _variant_setup(self, key: str, store: str, upstream: str, secret_file: Path) -> GatewaySetup:
        if key == "assertion":
            return write_gateway_config(
                self.work / "gw-assertion",
                store,
                upstream,
                upstream,
                assertion=True,
                secret_key_file=secret_file,
            )
        if key == "ratelimit":
            return write_gateway_config(
                self.work / "gw-ratelimit", store, upstream, upstream, secret_key_file=secret_file,
                rate_limit_store="memory",
            )  # fmt: skip
        raise SystemExit(f"unknown variant {key!r} (token, jwt, assertion, ratelimit)")


def render(variants: list[Variant], label: str, seconds: float, rate: int, rounds: int) -> str:
    """One table: stages down, variants across, µs of CPU per request (and the token path's %)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway"], cwd=REPO, capture_output=True,
                           text=True, check=False).stdout.strip()  # fmt: skip
    head = f"### {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {commit}{' + uncommitted changes' if dirty else ''}"
    lines = [head + (f": {label}" if label else ""), ""]
    lines.append("| stage | " + " | ".join(f"{v.label} µs" for v in variants) + " |")
    lines.append("|---|" + "---|" * len(variants))
    first = variants[0]
    for stage in STAGES:
        cells = []
        for variant in variants:
            share = variant.stages.get(stage, 0) / variant.samples if variant.samples else 0.0
            cell = f"{share * variant.cpu_us:.1f}"
            if variant is first:
                cell += f" ({share:.0%})"
            cells.append(cell)
        if any(variant.stages.get(stage) for variant in variants):
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **CPU per request** | " + " | ".join(f"**{v.cpu_us:.0f}**" for v in variants) + " |")
    if len(variants) > 1:
        lines.append(
            f"| vs {first.label} | – | "
            + " | ".join(
                f"{v.cpu_us - first.cpu_us:+.0f} µs ({v.cpu_us / first.cpu_us:.2f} ×)" for v in variants[1:]
            )
            + " |"
        )
    lines.append(
        "| CPU rounds (µs) | "
        + " | ".join(" / ".join(f"{c:.0f}" for c, _ in v.rounds) for v in variants)
        + " |"
    )
    lines.append(
        "| req/s (median round, unprofiled) | " + " | ".join(f"{v.rps:,.0f}" for v in variants) + " |"
    )
    lines.append("| samples | " + " | ".join(f"{v.samples:,}" for v in variants) + " |")
    lines.append("")
    lines.append(
        f"`python -m bench.profile --seconds {seconds:g} --rounds {rounds} --rate {rate}`: every variant's "
        f"server runs at once; each column's CPU per request is the median of {rounds} interleaved "
        f"{seconds:g} s wrk runs without the profiler, the shares come from one more {seconds:g} s run "
        "under py-spy, and a stage's µs are its share times that CPU."
    )
    return "\n".join(lines)


INTRO = """## Per-stage profile

Where one worker's CPU goes per proxied request (`python -m bench.profile`, see its docstring
for the method): µs of CPU per request by stage, on the throughput scenario's setup (SQLite,
50 connections, the nginx upstream and wrk on core 0, the gateway alone on core 1). The
token column also shows each stage's share. Newest first; a change to the request path is
argued from the difference between two of these tables."""


def update_results(table: str, results: Path = RESULTS) -> None:
    """Put `table` first in RESULTS.md's profile section (made before History if missing)."""
    text = results.read_text() if results.exists() else "# Gateway benchmark results\n"
    old: list[str] = []
    if PROFILE_BEGIN in text and PROFILE_END in text:
        before, _, rest = text.partition(PROFILE_BEGIN)
        section, _, after = rest.partition(PROFILE_END)
        old = ["### " + chunk.strip() for chunk in section.split("\n### ")[1:]]
    elif "\n## History" in text:
        before, sep, tail = text.partition("\n## History")
        before, after = before + "\n", sep.lstrip("\n") + tail
        after = "\n" + after
    else:
        before, after = text.rstrip("\n") + "\n\n", "\n"
    tables = [table.strip(), *old][:KEEP]
    section = PROFILE_BEGIN + "\n" + INTRO + "\n\n" + "\n\n".join(tables) + "\n" + PROFILE_END
    results.write_text(before + section + after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="each measured run (default 6)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved CPU rounds (default 3; the median)"
    )
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second (default 1000)")
    parser.add_argument("--label", default="", help="what this table is (e.g. 'before: …')")
    parser.add_argument("--variants", default="token,jwt,assertion,ratelimit")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave RESULTS.md alone")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (py-spy's raw stacks)")
    options = parser.parse_args(argv)
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is missing: pip install py-spy")
    work = REPO / "bench" / "work" / f"profile-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    profiler = Profiler(options.seconds, options.rate, work, env)
    try:
        keys = [key.strip() for key in options.variants.split(",") if key.strip()]
        variants = profiler.run(keys, max(1, options.rounds))
    finally:
        profiler.procs.stop_all()
    table = render(variants, options.label, options.seconds, options.rate, options.rounds)
    print(table)
    if not options.no_write:
        update_results(table)
        log(f"wrote the table into {RESULTS}")
    if options.keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
