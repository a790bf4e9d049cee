"""bench/RESULTS.md: the latest run in full, targets with PASS/FAIL, and a short history."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.profile import PROFILE_BEGIN, PROFILE_END

if TYPE_CHECKING:
    from bench.load import WrkResult
    from bench.run import Results, ServerRun

HISTORY_KEEP = 12
HEADLINE_MARK = "<!-- headline: "
HISTORY_HEADER = (
    "| date | commit | (c) SQLite req/s | (c) PG req/s | (d) bare req/s | (b) nginx req/s | (c) p99 ms "
    "| (c)/(b) | (c)/(d) | added µs (c) / (d) | stream MB/s down / up | peak RSS MB "
    "| lookup p99 ms SQLite / PG "
    "| targets |"
)


@dataclass
class Target:
    what: str
    measured: str
    passed: bool | None  # None: not measured
    interference: str = "–"
    """How much CPU other processes took while it was measured (see Method)."""

    @property
    def verdict(self) -> str:
        return "not measured" if self.passed is None else ("PASS" if self.passed else "FAIL")


def _f(value: float | None, fmt: str = ",.0f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f} %"


def _run(results: Results, key: str) -> ServerRun | None:
    run = results.runs.get(key)
    return run if run is not None and run.c50 is not None else None


def added_latency_us(results: Results, key: str, stat: str = "p50") -> float | None:
    """Latency at 1 connection through `key` minus that of the upstream direct, in µs.

    `stat` is "p50" (the median: what the targets use, robust to other processes' bursts
    on this shared machine) or "mean".
    """
    run, direct = _run(results, key), _run(results, "direct")
    if run is None or direct is None or run.c1 is None or direct.c1 is None:
        return None
    if stat == "mean":
        return (run.c1.lat_mean_ms - direct.c1.lat_mean_ms) * 1000
    return (run.c1.lat_p50_ms - direct.c1.lat_p50_ms) * 1000


def ratio(results: Results, a: str, b: str) -> float | None:
    run_a, run_b = _run(results, a), _run(results, b)
    if run_a is None or run_b is None or run_a.c50 is None or run_b.c50 is None or not run_b.c50.rps:
        return None
    return run_a.c50.rps / run_b.c50.rps


def _median(runs: dict[str, ServerRun], key: str) -> ServerRun | None:
    """`runs[key]` when it was measured (the edge scenario's dicts of runs)."""
    run = runs.get(key)
    return run if run is not None and run.c50 is not None else None


def _c50(runs: dict[str, ServerRun], key: str) -> WrkResult | None:
    run = _median(runs, key)
    return run.c50 if run is not None else None


def _c1(runs: dict[str, ServerRun], key: str) -> WrkResult | None:
    run = _median(runs, key)
    return run.c1 if run is not None else None


def rate_ratio(runs: dict[str, ServerRun], a: str, b: str) -> float | None:
    """req/s (round trips/s) of `a` over that of `b`, N connections, median rounds."""
    run_a, run_b = _c50(runs, a), _c50(runs, b)
    if run_a is None or run_b is None or not run_b.rps:
        return None
    return run_a.rps / run_b.rps


def p50_gap_us(runs: dict[str, ServerRun], a: str, b: str) -> float | None:
    """p50 latency at 1 connection (1 socket) of `a` minus that of `b`, in µs."""
    run_a, run_b = _c1(runs, a), _c1(runs, b)
    if run_a is None or run_b is None:
        return None
    return (run_a.lat_p50_ms - run_b.lat_p50_ms) * 1000


def cpu_gap_us(runs: dict[str, ServerRun], a: str, b: str) -> float | None:
    """CPU µs per request of `a` minus that of `b`, N connections."""
    run_a, run_b = _c50(runs, a), _c50(runs, b)
    if run_a is None or run_b is None or run_a.cpu_us_per_req is None or run_b.cpu_us_per_req is None:
        return None
    return run_a.cpu_us_per_req - run_b.cpu_us_per_req


# Issue 16's aims for one worker with every feature of the token path on: a share of the nginx
# proxy's throughput measured in the same rounds (0.20 the stretch), a p99, and a multiple of
# Express Gateway's throughput, which is not installed here: the issue's own measurement of it
# on this kind of machine (3,794 req/s) stands in, and the target says so.
NGINX_SHARE, NGINX_STRETCH = 0.12, 0.20
P99_AIM_MS = 10.0
EXPRESS_GATEWAY_RPS = 3794.0

# The budget of the TLS latency target: a fifth of the ≈240 µs the plain gateway adds to a
# request at 1 connection (README "Performance"); record encryption of a few hundred bytes
# each way should cost far less than that.
TLS_ADDED_BUDGET_US = 50.0


# The credential variants measured beside (c) SQLite in the same rounds: (key, what, lowest
# acceptable req/s ratio to (c)). The issue's aims: an access token (JWT) within 15 % of a
# `gw_` token; signing an assertion per request costs at most 20 % (or is explained: the
# CPU µs/req difference is its price, README "Identity assertion": about 60 µs).
SIGNED_VARIANTS = (
    ("gw-jwt", "JWT credential ≥ 0.85 × the token path (same rounds)", 0.85),
    # Issue 16: the assertion within 25 % (issue 12 asked 20 %).
    ("gw-assertion", "assertion: true ≥ 0.75 × without (same rounds)", 0.75),
    # Issue 13's aims: a memory rate limit within 5 %, a Redis one within 25 % of the plain path.
    ("gw-rl-memory", "rate limits in memory ≥ 0.95 × without (same rounds)", 0.95),
    ("gw-rl-redis", "rate limits on Redis ≥ 0.75 × without (same rounds)", 0.75),
)


def signed_variant_line(results: Results, key: str) -> str:
    """'(j)/(c) JWT vs token: …' or '(k)/(c) assertion vs no assertion: …': the req/s ratio,
    the CPU µs/req difference (N connections) and the p50 difference at 1 connection."""
    what = {
        "gw-jwt": "(j)/(c) JWT vs token",
        "gw-assertion": "(k)/(c) assertion vs no assertion",
        "gw-rl-memory": "(l)/(c) rate limits in memory vs none",
        "gw-rl-redis": "(m)/(c) rate limits on Redis vs none",
    }[key]
    cpu = cpu_gap_us(results.runs, key, "gw-sqlite")
    c50, base = _c50(results.runs, key), _c50(results.runs, "gw-sqlite")
    per_req = (
        ""
        if c50 is None or base is None or c50.cpu_us_per_req is None or base.cpu_us_per_req is None
        else f" ({c50.cpu_us_per_req:.0f} vs {base.cpu_us_per_req:.0f})"
    )
    latency = p50_gap_us(results.runs, key, "gw-sqlite")
    return (
        f"- {what}: {_f(ratio(results, key, 'gw-sqlite'), '.2f')} (throughput); CPU per request "
        f"{_f(cpu, '+,.0f')} µs{per_req}; p50 at 1 connection {_f(latency, '+,.0f')} µs"
    )


def _others(*results: WrkResult | None) -> str:
    """'core 1: others took X % (…)' for the runs a target compares."""
    shares = [r.others_on_sut_core for r in results if r is not None and r.others_on_sut_core is not None]
    if not shares:
        return "–"
    return " / ".join(f"{share * 100:.0f} %" for share in shares) + " of core 1"


def targets(results: Results) -> list[Target]:
    found: list[Target] = []
    throughput = "throughput" in results.options.only
    bare = _run(results, "bare")
    bare_c50 = bare.c50 if bare is not None else None
    bare_c1 = bare.c1 if bare is not None else None
    bare_added = added_latency_us(results, "bare")
    for key, store in (("gw-sqlite", "SQLite"), ("gw-pg", "PostgreSQL")):
        if not throughput:
            continue
        run = _run(results, key)
        c50 = run.c50 if run is not None else None
        c1 = run.c1 if run is not None else None
        vs_bare = ratio(results, key, "bare")
        found.append(
            Target(
                f"one worker ({store}) ≥ 0.9 × (d) throughput",
                "–"
                if c50 is None or vs_bare is None or bare_c50 is None
                else f"{c50.rps:,.0f} req/s = {vs_bare:.2f} × (d)'s {bare_c50.rps:,.0f}",
                None if vs_bare is None else vs_bare >= 0.9,
                _others(c50, bare_c50),
            )
        )
        found.append(
            Target(
                f"one worker ({store}) ≥ 2 × 3,100 = 6,200 req/s",
                "–" if c50 is None else f"{c50.rps:,.0f} req/s",
                None if c50 is None else c50.rps >= 6200,
                _others(c50),
            )
        )
        found.append(
            Target(
                f"p99 ≤ 20 ms at {results.options.connections} connections ({store})",
                "–" if c50 is None else f"{c50.lat_p99_ms:.2f} ms",
                None if c50 is None else c50.lat_p99_ms <= 20,
                _others(c50),
            )
        )
        added = added_latency_us(results, key)
        found.append(
            Target(
                f"added latency at 1 connection ≤ 1.2 × (d)'s ({store}; medians)",
                "–"
                if added is None or bare_added is None
                else f"{added:.0f} µs vs (d) {bare_added:.0f} µs (limit {1.2 * bare_added:.0f} µs)",
                None if added is None or bare_added is None else added <= 1.2 * bare_added,
                _others(c1, bare_c1),
            )
        )
    if throughput:
        found.extend(issue16_targets(results))
        base = _c50(results.runs, "gw-sqlite")
        for key, what, floor in SIGNED_VARIANTS:
            c50 = _c50(results.runs, key)
            vs_base = ratio(results, key, "gw-sqlite")
            cpu = cpu_gap_us(results.runs, key, "gw-sqlite")
            found.append(
                Target(
                    what,
                    "–"
                    if c50 is None or base is None or vs_base is None
                    else f"{c50.rps:,.0f} req/s = {vs_base:.2f} × (c) SQLite's {base.rps:,.0f}; "
                    f"CPU {_f(cpu, '+,.0f')} µs/req",
                    None if vs_base is None else vs_base >= floor,
                    _others(c50, base),
                )
            )
    if "streaming" in results.options.only:
        through = {r.direction: r for label, r in results.streams if label == "through the gateway"}
        for direction in ("download", "upload"):
            result = through.get(direction)
            found.append(
                Target(
                    f"streaming {direction} ≥ 300 MB/s",
                    "–" if result is None else f"{result.mb_per_s:,.0f} MB/s",
                    None if result is None else result.mb_per_s >= 300,
                    "–" if result is None else f"{_pct(result.others_on_sut_core)} of core 1",
                )
            )
        peak = max((r.peak_rss_mb for r in through.values()), default=None)
        found.append(
            Target(
                "gateway peak RSS while streaming ≤ 100 MB",
                "–" if peak is None else f"{peak:.1f} MB",
                None if peak is None else peak <= 100,
            )
        )
    if "lookups" in results.options.only:
        for lookup in results.lookups:
            for kind, p99 in (("existing", lookup.known_p99_ms), ("unknown", lookup.unknown_p99_ms)):
                found.append(
                    Target(
                        f"cold lookup p99 ≤ 5 ms ({lookup.store}, {kind} digests, {lookup.tokens:,} tokens)",
                        f"{p99:.2f} ms",
                        p99 <= 5,
                        f"machine {_pct(lookup.machine_busy)} busy, this process {_pct(lookup.own_cpu)}",
                    )
                )
    if "edge" in results.options.only:
        found.extend(edge_targets(results))
    return found


def issue16_targets(results: Results) -> list[Target]:
    """One worker (SQLite) against nginx, its p99 and Express Gateway (issue 16)."""
    c50, nginx = _c50(results.runs, "gw-sqlite"), _c50(results.runs, "nginx")
    share = ratio(results, "gw-sqlite", "nginx")
    stretch = (
        ""
        if share is None
        else f"; stretch {NGINX_STRETCH:.2f} × {'met' if share >= NGINX_STRETCH else 'not met'}"
    )
    return [
        Target(
            f"one worker (SQLite) ≥ {NGINX_SHARE:.2f} × (b) the nginx proxy (same rounds)",
            "–"
            if c50 is None or nginx is None or share is None
            else f"{c50.rps:,.0f} req/s = {share:.3f} × (b)'s {nginx.rps:,.0f}{stretch}",
            None if share is None else share >= NGINX_SHARE,
            _others(c50, nginx),
        ),
        Target(
            f"one worker (SQLite) p99 ≤ {P99_AIM_MS:.0f} ms at {results.options.connections} connections",
            "–" if c50 is None else f"{c50.lat_p99_ms:.2f} ms",
            None if c50 is None else c50.lat_p99_ms <= P99_AIM_MS,
            _others(c50),
        ),
        Target(
            f"one worker (SQLite) ≥ 3 × Express Gateway ({EXPRESS_GATEWAY_RPS:,.0f} req/s: issue 16's "
            "figure, not installed here)",
            "–" if c50 is None else f"{c50.rps:,.0f} req/s = {c50.rps / EXPRESS_GATEWAY_RPS:.2f} ×",
            None if c50 is None else c50.rps >= 3 * EXPRESS_GATEWAY_RPS,
            _others(c50),
        ),
    ]


def edge_targets(results: Results) -> list[Target]:
    """TLS and WebSocket targets of the edge scenario."""
    tls, ws = results.tls_runs, results.ws_runs
    connections = results.options.connections
    found: list[Target] = []
    gw, gw_tls = _c50(tls, "gw"), _c50(tls, "gw-tls")
    vs_plain = rate_ratio(tls, "gw-tls", "gw")
    found.append(
        Target(
            f"gateway TLS throughput ≥ 0.85 × gateway plain HTTP ({connections} connections, same rounds)",
            "–"
            if gw is None or gw_tls is None or vs_plain is None
            else f"{gw_tls.rps:,.0f} req/s = {vs_plain:.2f} × plain's {gw.rps:,.0f}",
            None if vs_plain is None else vs_plain >= 0.85,
            _others(gw_tls, gw),
        )
    )
    found.append(
        Target(
            f"gateway TLS p99 ≤ 20 ms at {connections} connections (SQLite)",
            "–" if gw_tls is None else f"{gw_tls.lat_p99_ms:.2f} ms",
            None if gw_tls is None else gw_tls.lat_p99_ms <= 20,
            _others(gw_tls),
        )
    )
    gw_cpu, tls_cpu = (r.cpu_us_per_req if r is not None else None for r in (gw, gw_tls))
    cpu_ratio = tls_cpu / gw_cpu if tls_cpu is not None and gw_cpu else None
    found.append(
        Target(
            "gateway CPU per request with TLS ≤ 1.18 × without (the CPU form of the 0.85 above: "
            "it does not depend on how much of core 1 others took)",
            "–" if cpu_ratio is None else f"{tls_cpu:.0f} µs vs {gw_cpu:.0f} µs = {cpu_ratio:.2f} ×",
            None if cpu_ratio is None else cpu_ratio <= 1.18,
            _others(gw_tls, gw),
        )
    )
    added = p50_gap_us(tls, "gw-tls", "gw")
    found.append(
        Target(
            f"TLS adds ≤ {TLS_ADDED_BUDGET_US:.0f} µs per request at 1 connection "
            "(gateway; p50 TLS − p50 plain)",
            "–" if added is None else f"{added:.0f} µs",
            None if added is None else added <= TLS_ADDED_BUDGET_US,
            _others(_c1(tls, "gw-tls"), _c1(tls, "gw")),
        )
    )
    nginx_tls = _c50(tls, "nginx-tls")
    vs_nginx = rate_ratio(tls, "gw-tls", "nginx-tls")
    found.append(
        Target(
            "gateway TLS ≥ 0.5 × nginx terminating TLS with the same certificate (same rounds)",
            "–"
            if gw_tls is None or nginx_tls is None or vs_nginx is None
            else f"{gw_tls.rps:,.0f} req/s = {vs_nginx:.2f} × nginx's {nginx_tls.rps:,.0f}",
            None if vs_nginx is None else vs_nginx >= 0.5,
            _others(gw_tls, nginx_tls),
        )
    )
    ws_gw = _c50(ws, "ws-gw")
    per_rt = ws_gw.cpu_us_per_req if ws_gw is not None else None
    per_req = gw.cpu_us_per_req if gw is not None else None
    found.append(
        Target(
            "gateway CPU per WebSocket round trip ≤ its CPU per proxied HTTP request (same run)",
            "–" if per_rt is None or per_req is None else f"{per_rt:.0f} µs vs {per_req:.0f} µs",
            None if per_rt is None or per_req is None else per_rt <= per_req,
            _others(ws_gw, gw),
        )
    )
    rounds = [r for run in ws.values() for r in run.c50_rounds + run.c1_rounds]
    errors = sum(r.error_count for r in rounds)
    found.append(
        Target(
            "no WebSocket round trip lost, late (> 5 s) or wrong (every run, every round)",
            "–" if not rounds else f"{errors} error(s) in {sum(r.requests for r in rounds):,} round trips",
            None if not rounds else errors == 0,
        )
    )
    return found


def _rounds_note(run: ServerRun) -> str:
    """The run's note, plus every round's req/s when there was more than one."""
    parts = [run.note] if run.note else []
    if len(run.c50_rounds) > 1:
        parts.append("rounds: " + " / ".join(f"{r.rps:,.0f}" for r in run.c50_rounds))
    return "; ".join(parts)


def _wrk_row(label: str, result: WrkResult | None, note: str = "") -> str:
    if result is None:
        return f"| {label} | – | – | – | – | – | – | – | – | {note or 'not measured'} |"
    errors = result.error_count
    util = "–" if result.cpu_util is None else f"{result.cpu_util * 100:.0f} %"
    others = "–" if result.others_on_sut_core is None else f"{result.others_on_sut_core * 100:.0f} %"
    return (
        f"| {label} | {result.rps:,.0f} | {result.lat_p50_ms:.2f} | {result.lat_p99_ms:.2f} "
        f"| {result.lat_max_ms:.1f} | {_f(result.cpu_us_per_req)} | {util} "
        f"| {others} | {errors} | {note} |"
    )


def headline(results: Results) -> str:
    facts = results.facts
    gw, pg = _run(results, "gw-sqlite"), _run(results, "gw-pg")
    bare, nginx = _run(results, "bare"), _run(results, "nginx")
    through = {r.direction: r for label, r in results.streams if label == "through the gateway"}
    peak = max((r.peak_rss_mb for r in through.values()), default=None)
    lookups = {lk.store: lk for lk in results.lookups}
    all_targets = targets(results)
    passed = sum(1 for t in all_targets if t.passed)
    measured = sum(1 for t in all_targets if t.passed is not None)

    def rps(run: ServerRun | None) -> str:
        return "–" if run is None or run.c50 is None else f"{run.c50.rps:,.0f}"

    def lookup_p99(store: str) -> str:
        lk = lookups.get(store)
        return "–" if lk is None else f"{max(lk.known_p99_ms, lk.unknown_p99_ms):.2f}"

    added_gw, added_bare = added_latency_us(results, "gw-sqlite"), added_latency_us(results, "bare")
    cells = [
        facts.get("date", "?")[:16],
        facts.get("git commit", "?")[:10],
        rps(gw),
        rps(pg),
        rps(bare),
        rps(nginx),
        "–" if gw is None or gw.c50 is None else f"{gw.c50.lat_p99_ms:.1f}",
        _f(ratio(results, "gw-sqlite", "nginx"), ".2f"),
        _f(ratio(results, "gw-sqlite", "bare"), ".2f"),
        f"{_f(added_gw)} / {_f(added_bare)}",
        " / ".join(_f(through[d].mb_per_s) if d in through else "–" for d in ("download", "upload")),
        _f(peak, ".1f"),
        f"{lookup_p99('SQLite')} / {lookup_p99('PostgreSQL')}",
        f"{passed}/{measured}",
    ]
    return "| " + " | ".join(cells) + " |"


def _history(previous: Path) -> list[str]:
    """Headline rows of earlier runs: the previous file's own headline first, then its history."""
    try:
        text = previous.read_text()
    except OSError:
        return []
    rows: list[str] = []
    for line in text.splitlines():
        if line.startswith(HEADLINE_MARK) and line.endswith(" -->"):
            rows.append(line[len(HEADLINE_MARK) : -len(" -->")])
    _, _, tail = text.partition("\n## History")
    for line in tail.splitlines():
        if line.startswith("| ") and not line.startswith("| date ") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append(line)
    # Once: the previous run's headline may already be in its table (added with its notes).
    return list(dict.fromkeys(rows))[:HISTORY_KEEP]


def _history_notes(previous: Path) -> list[str]:
    """The paragraphs written by hand above the previous file's History table (kept as they are)."""
    try:
        text = previous.read_text()
    except OSError:
        return []
    _, _, tail = text.partition("\n## History")
    notes: list[str] = []
    for line in tail.splitlines()[1:]:
        if line.startswith("| date "):
            break
        if line.startswith("Headline numbers of earlier runs"):
            continue
        notes.append(line)
    while notes and not notes[0].strip():
        notes.pop(0)
    return notes


def _profile_section(previous: Path) -> str:
    """The previous file's per-stage profile section (bench/profile.py writes it), markers included."""
    try:
        text = previous.read_text()
    except OSError:
        return ""
    begin, end = PROFILE_BEGIN, PROFILE_END
    if begin not in text or end not in text:
        return ""
    return begin + text.partition(begin)[2].partition(end)[0] + end


def render(results: Results, previous: Path) -> str:
    options = results.options
    facts = results.facts
    out: list[str] = []
    add = out.append
    mode = (
        "full run"
        if options.everything
        else (("quick run" if options.quick else "partial run") + f", scenarios: {', '.join(options.only)}")
    )
    add("# Gateway benchmark results")
    add("")
    add(
        f"Latest run: {facts.get('date', '?')}, {mode}, {results.elapsed_s:.0f} s in all. "
        "This file is overwritten by every full run of the bench; the **History** section at the "
        "bottom keeps the headline numbers of earlier runs."
    )
    add("")
    add(
        "Re-run (as root, from the repository root; installs `nginx-light` and `wrk` "
        "with apt-get if missing):"
    )
    add("")
    add("```sh")
    add("bash bench/run.sh                       # everything, 11-16 minutes; rewrites bench/RESULTS.md")
    add("bash bench/run.sh --quick               # short runs; writes bench/work/RESULTS.partial.md")
    add("bash bench/run.sh --only throughput     # or streaming, lookups, edge (comma-separated or repeated)")
    add("```")
    add("")
    add("## Targets")
    add("")
    add(
        "The last column is how much CPU other processes took while the figure was measured "
        "(see Method): this machine is shared, and throughput and latency figures taken while "
        "others used a large share of core 1 understate what the code can do. Re-run on a quiet "
        "machine before drawing conclusions from a FAIL that comes with a large share there."
    )
    add("")
    add("| target | measured | verdict | others' CPU while measured |")
    add("|---|---|---|---|")
    for target in targets(results):
        add(f"| {target.what} | {target.measured} | **{target.verdict}** | {target.interference} |")
    add("")
    add("## Machine")
    add("")
    add("| fact | value |")
    add("|---|---|")
    for key, value in facts.items():
        add(f"| {key} | {value} |")
    add("")
    add(
        "This machine is shared: other processes (other sessions' test servers, PostgreSQL, brokers) "
        "run on both cores and are not pinned, so every figure carries that noise. Load averages:"
    )
    add("")
    for note in results.notes:
        add(f"- {note}")
    add("")
    add("## Method")
    add("")
    add(
        f"- Load: `wrk -t1 -c{options.connections}` pinned to core 0 (`taskset -c 0`), {options.warmup:g} s "
        f"warm-up (discarded, first round only), then {options.duration:g} s measured; "
        f"then `-c1` for {options.c1_duration:g} s "
        "to get the latency a single client sees. Latency percentiles come from wrk's own histogram "
        "(`bench/wrk_report.lua` prints them as JSON at the end; no per-request Lua runs)."
    )
    add(
        f"- Rounds: every server is started before the first load and stays up (idle while another "
        f"is measured); then {options.rounds} round(s), each measuring every server in turn. A figure is "
        "the median round (by req/s; by p50 latency at 1 connection), and the table lists every "
        "round's req/s, so a slow spell of this shared machine hits all servers alike instead of "
        "one. The idle gateways' background work (change-feed poll every 250 ms) is part of "
        "'others on core 1'."
    )
    add(
        "- Upstream: nginx (`nginx-light`, one process: `master_process off`, `access_log off`) answering "
        "every request with a fixed 98-byte JSON body. **It runs on core 0 together with wrk**, so the "
        "server under test has core 1 to itself; (a) is therefore wrk and nginx sharing one core."
    )
    add(
        "- Server under test pinned to core 1 (`taskset -c 1`): (b) nginx as a plain reverse proxy "
        "(keep-alive pool to the upstream), (c) `python -m gateway --config X serve` (uvloop, "
        "`log_level: info`, JSON log on stderr to a file) with a real token from its store, a real "
        "route policy (`GET /bench/**` requires `bench:read`) and the identity headers, on SQLite and "
        "on a fresh PostgreSQL database `gw_bench_<random>` (dropped afterwards), and (d) "
        "`bench/bare_proxy.py`: aiohttp + uvloop, a dict of tokens, no policy, no logging, response "
        "streamed with StreamResponse; (e) the same bare proxy with `--client gateway`: "
        "aiohttp.ClientSession replaced by the gateway's upstream client (`gateway/upstream.py`), "
        "nothing else changed."
    )
    add(
        "- Credentials and signing, beside (c) SQLite and measured right after it in every round: "
        "(j) the same (c) process and config, but wrk sends `Authorization: Bearer <JWT>`, an access "
        "token (ES256, `typ: at+jwt`) for which an API key of user `bench` (`key create`) was "
        "exchanged at `POST /.gateway/token` on the running gateway (client credentials; exchanged "
        "again if fewer than 5 minutes of it remain); the gateway verifies its signature once and "
        "then serves it from its per-process claims cache and the key's cached state. (k) a second "
        "`gateway serve` on the same SQLite store and `gw_` token whose `bench` route has "
        "`assertion: true`: every forwarded request gets an ES256-signed `X-Service-User-Assertion` "
        "(its config differs from (c)'s only in that and in `signing.secret_key_file`, the sealing "
        "secret (c)'s first start wrote). A check before the load verifies, through the upstream "
        "(which echoes the header on `/bench/assertion` only), that (k)'s assertion verifies "
        "against the gateway's JWKS and names user, method and path, and that (c) sends none."
    )
    add(
        "- Rate limits, beside (c) SQLite in the same rounds: (l) and (m) are two more `gateway serve` "
        "processes on (c)'s store and token whose configs add `rate_limits` with `per_user`, "
        "`auth_failures` and the `bench` route's `rate_limit`, each at 1,000,000 per second (so every "
        "check runs and none refuses): (l) on the memory store, (m) on the real Redis "
        "(127.0.0.1:6379, database 3). Per request that is an address check before the credential "
        "and the user + route check after it: two Redis round trips for (m)."
    )
    add(
        "- Before each load a request checks the 98-byte body and, through (c), (d), (j) and (k), "
        "that the upstream saw `X-Service-User: bench` (nginx echoes it as `X-Seen-User`)."
    )
    add(
        "- CPU µs per request: utime+stime+cutime+cstime of the server under test (and any child "
        "process) from `/proc/PID/stat`, before and after the measured run, divided by the requests "
        "wrk completed. Server CPU % is the same CPU time over the wall time (100 % = one core)."
    )
    add(
        "- Others on core 1: the busy time of core 1 (`/proc/stat`) during the run minus the server's "
        "own, over the run's time: how much of the server's core other processes took. Before each "
        f"server's runs the bench waits (at most {options.settle:g} s) for the machine's CPU use to "
        "drop below 25 %; the other processes are not stopped, so a figure taken while they were "
        "busy is lower than the code can do."
    )
    add(
        "- Added latency per request: median (p50) latency at 1 connection through the server minus "
        "that of (a) at 1 connection (the target compares these medians; the mean-based difference "
        "is shown too, but the means carry the other processes' bursts)."
    )
    add(
        "- On this shared 2-core VM, single runs of the same commit differed by 15-40 % in req/s "
        "while other processes were active (hence the rounds), so read a figure together with its "
        "rounds, its interference column and the History section."
    )
    add("- Every process is started and stopped by PID; all traffic goes to 127.0.0.1.")
    add("")
    if "throughput" in options.only:
        add(f"## Throughput and latency, {options.connections} connections")
        add("")
        add(
            "| server | req/s | p50 ms | p99 ms | max ms | CPU µs/req | server CPU "
            "| others on core 1 | errors | note |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for run in results.runs.values():
            add(_wrk_row(run.label, run.c50, _rounds_note(run)))
        if results.workers2_run is not None:
            add(_wrk_row("(c) gateway `--workers auto`, SQLite", results.workers2_run, "unpinned"))
        add("")
        add(
            f"- (c)/(b) throughput: SQLite {_f(ratio(results, 'gw-sqlite', 'nginx'), '.2f')}, "
            f"PostgreSQL {_f(ratio(results, 'gw-pg', 'nginx'), '.2f')}"
        )
        add(
            f"- (c)/(d) throughput: SQLite {_f(ratio(results, 'gw-sqlite', 'bare'), '.2f')}, "
            f"PostgreSQL {_f(ratio(results, 'gw-pg', 'bare'), '.2f')}"
        )
        add(
            f"- (e)/(d) throughput: {_f(ratio(results, 'bare-lean', 'bare'), '.2f')} (the same bare proxy; "
            "only aiohttp.ClientSession replaced by the gateway's upstream client, gateway/upstream.py)"
        )
        for key, _, _ in SIGNED_VARIANTS:
            if key in results.runs:
                add(signed_variant_line(results, key))
        cpu = {k: r.c50.cpu_us_per_req for k, r in results.runs.items() if r.c50 is not None}
        if cpu.get("gw-sqlite") and cpu.get("bare") and cpu.get("nginx"):
            add(
                f"- (c)/(b) CPU per request: {cpu['gw-sqlite'] / cpu['nginx']:.1f} ×; "
                f"(c)/(d) CPU per request: {cpu['gw-sqlite'] / cpu['bare']:.2f} × (SQLite)"
            )
        add(f"- `gateway serve --workers auto`: {results.workers2}")
        add("")
        add("### 1 connection (added latency)")
        add("")
        add(
            "| server | req/s | mean µs | p50 µs | p99 µs | added µs (mean − (a)) "
            "| added µs (p50 − (a)) | CPU µs/req | others on core 1 |"
        )
        add("|---|---|---|---|---|---|---|---|---|")
        for key, run in results.runs.items():
            if run.c1 is None:
                add(f"| {run.label} | – | – | – | – | – | – | – | – |")
                continue
            added = "–" if key == "direct" else _f(added_latency_us(results, key, "mean"))
            added_p50 = "–" if key == "direct" else _f(added_latency_us(results, key))
            add(
                f"| {run.label} | {run.c1.rps:,.0f} | {run.c1.lat_mean_ms * 1000:,.0f} "
                f"| {run.c1.lat_p50_ms * 1000:,.0f} | {run.c1.lat_p99_ms * 1000:,.0f} "
                f"| {added} | {added_p50} "
                f"| {_f(run.c1.cpu_us_per_req)} | {_pct(run.c1.others_on_sut_core)} |"
            )
        add("")
    if "streaming" in options.only:
        size = options.stream_bytes
        add(f"## Streaming, {size / 1e9:g} GB each way (1 GB = 10^9 bytes, MB = 10^6 bytes)")
        add("")
        add(
            "Upstream `bench/stream_upstream.py` (aiohttp, core 0) streams N bytes or consumes the body; "
            "client `curl` (download to /dev/null; upload `-T` of a sparse file, so with "
            "Content-Length and curl's `Expect: 100-continue`). Through the gateway (SQLite store, "
            "`log_level: info`): the gateway on core 1, curl on core 0 with the upstream. Direct: curl "
            "on core 1, so client and upstream do not share a core (a reference for what they can do "
            "without the gateway). RSS: VmRSS from `/proc/PID/status` every 50 ms during the "
            "transfer, of the gateway (of the upstream in the direct rows)."
        )
        add("")
        add(
            "| path | direction | MB/s | seconds | peak RSS MB | RSS before MB | VmHWM MB "
            "| server CPU | others on core 1 | samples |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|")
        for label, result in results.streams:
            add(
                f"| {label} | {result.direction} | {result.mb_per_s:,.0f} | {result.seconds:.2f} "
                f"| {result.peak_rss_mb:.1f} | {result.baseline_rss_mb:.1f} | {result.hwm_mb:.1f} "
                f"| {result.gateway_cpu_util * 100:.0f} % | {_pct(result.others_on_sut_core)} "
                f"| {result.rss_samples} |"
            )
        add("")
    if "lookups" in options.only:
        add(f"## Cold token lookups, {options.lookup_tokens:,} tokens")
        add("")
        add(
            "Stores filled with SQLAlchemy core `insert()` executemany on the gateway's own tables "
            "(1,000 service users with 2 roles each, an allowed origin for one in ten, and the tokens "
            "spread over them; digest = `gateway.tokens.digest(secret)`), then `ANALYZE`. Then "
            "`Store.lookup_token(digest)` is timed directly (no identity cache, so every call is the "
            "store's real read path: one statement, token ⋈ user by the digest index with the "
            "user's roles and origins aggregated in correlated subqueries) for "
            "random existing digests and unknown ones, interleaved in random order, from one "
            "process on uvloop. The database files/pages are warm in the OS page cache after the "
            "fill; only the gateway's own cache is cold."
        )
        add("")
        add(
            "| store | fill s | rows/s | existing | p50 ms | p99 ms | mean ms "
            "| unknown | p50 ms | p99 ms | mean ms | machine busy | this process |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for lk in results.lookups:
            add(
                f"| {lk.store} | {lk.fill.seconds:.1f} | {lk.fill.rows_per_s:,.0f} | {lk.known:,} "
                f"| {lk.known_p50_ms:.2f} | {lk.known_p99_ms:.2f} | {lk.known_mean_ms:.2f} | {lk.unknown:,} "
                f"| {lk.unknown_p50_ms:.2f} | {lk.unknown_p99_ms:.2f} | {lk.unknown_mean_ms:.2f} "
                f"| {_pct(lk.machine_busy)} | {_pct(lk.own_cpu)} |"
            )
        for note in results.lookup_notes:
            add(f"- {note}")
        add("")
    if "edge" in options.only:
        out.extend(_tls_section(results))
        out.extend(_ws_section(results))
    add("## Exact commands")
    add("")
    add(
        "Paths are those of this run's work directory (`bench/work/run-*`, removed afterwards unless "
        "`--keep`); `$TOKEN` stands for the secret the `token set` command printed, `$KEY_SECRET` "
        "for the one `key create` printed and `$ACCESS_TOKEN` for the JWT the exchange answered. "
        "The configuration files written there follow the commands."
    )
    add("")
    add("```sh")
    out.extend(results.commands)
    add("```")
    add("")
    for name, content in results.configs.items():
        add(f"<details><summary><code>{name}</code></summary>")
        add("")
        add("```")
        out.extend(content.rstrip("\n").splitlines())
        add("```")
        add("")
        add("</details>")
        add("")
    row = headline(results)
    kept = _profile_section(previous)
    if kept:
        out.extend([kept, ""])
    add("## History")
    add("")
    add("Headline numbers of earlier runs (newest first; (c) is the gateway on SQLite unless marked PG).")
    add("")
    out.extend(_history_notes(previous))
    add(HISTORY_HEADER)
    add("|" + "---|" * HISTORY_HEADER.count(" | ") + "---|")
    out.extend(_history(previous))
    add("")
    add(HEADLINE_MARK + row + " -->")
    add("")
    return "\n".join(out)


def _tls_section(results: Results) -> list[str]:
    """## TLS termination: gateway and nginx, each with and without TLS, in the same rounds."""
    options = results.options
    runs = results.tls_runs
    out = [f"## TLS termination, {options.connections} connections", ""]
    out.append(
        "The same self-signed pair (ECDSA P-256, made in the work directory) served by (g) nginx "
        "(`listen … ssl`, TLS 1.2/1.3, the gateway's cipher list; the same keep-alive upstream pool "
        "as (b)) and (f) `gateway serve` on SQLite with the proxy listener in the object form "
        "(`listeners.proxy: {listen, tls: {cert_file, key_file}}`). (c) is the same gateway config "
        "with a plain listener (the two share one SQLite store and token); (b) is the plain nginx "
        "proxy again. All four run on core 1 and are measured in the same interleaved rounds with "
        "`wrk https://…` on core 0, as in the throughput scenario, so each TLS figure has its own "
        "plain-HTTP figure from the same sitting."
    )
    out.append("")
    out.append(
        "**Handshakes are amortised:** wrk keeps its connections alive, so each connection does one "
        "TLS handshake when the run starts and none after; these figures are the cost of TLS records "
        "(decrypting requests, encrypting answers) on warm connections. Clients that open a "
        "connection per request would also pay a full handshake (ECDHE + an ECDSA P-256 signature) "
        "each time, which is not measured here."
    )
    if results.tls_negotiated:
        out.append("")
        out.append(
            "Negotiated with a default OpenSSL client (Python's `ssl`, the same library and defaults "
            "as wrk's): "
            + "; ".join(f"{label}: {what}" for label, what in results.tls_negotiated.items())
            + "."
        )
    out.append("")
    out.append(
        "wrk does its side of TLS on core 0, beside the upstream: where the *core 0 busy* column is "
        "near 100 % the load side was the limit and the server had time to spare (nginx, as a "
        "rule), so compare CPU µs/req there rather than req/s."
    )
    out.append("")
    out.append(
        "| server | req/s | p50 ms | p99 ms | max ms | CPU µs/req | server CPU | core 0 busy "
        "| others on core 1 | errors | note |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs.values():
        out.append(_tls_row(run.label, run.c50, _rounds_note(run)))
    out.append("")
    gw_cpu, ng_cpu = cpu_gap_us(runs, "gw-tls", "gw"), cpu_gap_us(runs, "nginx-tls", "nginx")
    out.append(
        f"- (f)/(g) gateway TLS / nginx TLS throughput: {_f(rate_ratio(runs, 'gw-tls', 'nginx-tls'), '.2f')}"
    )
    out.append(
        f"- TLS cost in throughput: gateway (f)/(c) {_f(rate_ratio(runs, 'gw-tls', 'gw'), '.2f')}, "
        f"nginx (g)/(b) {_f(rate_ratio(runs, 'nginx-tls', 'nginx'), '.2f')} "
        f"(for reference, plain (c)/(b): {_f(rate_ratio(runs, 'gw', 'nginx'), '.2f')})"
    )
    out.append(
        f"- TLS cost in CPU per request: gateway {_f(gw_cpu, '+,.0f')} µs, nginx {_f(ng_cpu, '+,.0f')} µs "
        "(CPU µs/req with TLS minus without, same rounds)"
    )
    out.append("")
    out.append("### 1 connection (the latency TLS adds)")
    out.append("")
    out.append(
        "| server | req/s | mean µs | p50 µs | p99 µs | TLS adds µs (p50 − plain p50) | CPU µs/req "
        "| others on core 1 |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    plain_of = {"nginx-tls": "nginx", "gw-tls": "gw"}
    for key, run in runs.items():
        if run.c1 is None:
            out.append(f"| {run.label} | – | – | – | – | – | – | – |")
            continue
        added = _f(p50_gap_us(runs, key, plain_of[key]), "+,.0f") if key in plain_of else "–"
        out.append(
            f"| {run.label} | {run.c1.rps:,.0f} | {run.c1.lat_mean_ms * 1000:,.0f} "
            f"| {run.c1.lat_p50_ms * 1000:,.0f} | {run.c1.lat_p99_ms * 1000:,.0f} | {added} "
            f"| {_f(run.c1.cpu_us_per_req)} | {_pct(run.c1.others_on_sut_core)} |"
        )
    out.append("")
    return out


def _tls_row(label: str, result: WrkResult | None, note: str) -> str:
    """A wrk row with the load core's busy share (wrk encrypts too) before 'others on core 1'."""
    if result is None:
        return f"| {label} | – | – | – | – | – | – | – | – | – | {note or 'not measured'} |"
    return (
        f"| {label} | {result.rps:,.0f} | {result.lat_p50_ms:.2f} | {result.lat_p99_ms:.2f} "
        f"| {result.lat_max_ms:.1f} | {_f(result.cpu_us_per_req)} | {_pct(result.cpu_util)} "
        f"| {_pct(result.raw.get('load_core_busy'))} | {_pct(result.others_on_sut_core)} "
        f"| {result.error_count} | {note} |"
    )


def _ws_row(label: str, result: WrkResult | None, note: str) -> str:
    if result is None:
        return f"| {label} | – | – | – | – | – | – | – | – | – | – | – | {note or 'not measured'} |"
    raw = result.raw
    return (
        f"| {label} | {result.connections} | {result.rps:,.0f} | {result.lat_p50_ms * 1000:,.0f} "
        f"| {result.lat_p99_ms * 1000:,.0f} | {result.lat_max_ms:.1f} | {_f(result.cpu_us_per_req)} "
        f"| {_pct(result.cpu_util)} | {_pct(raw.get('client_cpu'))} | {_pct(raw.get('load_core_busy'))} "
        f"| {_pct(result.others_on_sut_core)} | {result.error_count} | {note} |"
    )


def _ws_section(results: Results) -> list[str]:
    """## WebSocket round trips: direct to the echo upstream and through the gateway."""
    options = results.options
    runs = results.ws_runs
    out = ["## WebSocket round trips", ""]
    out.append(
        f"Upstream `bench/ws_upstream.py` (aiohttp + uvloop, core 0) echoes every message. Client "
        f"`bench/ws_load.py` (aiohttp `ws_connect` on uvloop, core 0): {options.ws_sockets} sockets "
        f"(then 1), each sending a {options.ws_size}-byte binary message, waiting for its echo, "
        "checking it byte for byte and sending the next (one message in flight per socket), "
        f"{options.warmup:g} s warm-up (0.5 s with 1 socket) then {options.duration:g} s measured "
        f"({options.c1_duration:g} s with 1 socket). (h) goes straight to the upstream; (i) goes "
        "through `gateway serve` (core 1, SQLite, the (c) process of the TLS section) on a route "
        "with `websocket: true`, authenticated with `Authorization: Bearer` on the handshake: "
        "the gateway parses every message on one side and frames it again on the other, so a "
        "round trip is two messages relayed. The client reads the server's CPU time and the busy "
        "time of core 0 and core 1 at the edges of its measured window (connects, warm-up and "
        "closes excluded). Server CPU in (h) is the upstream's, in (i) the gateway's."
    )
    out.append("")
    out.append(
        "Core 0 carries the client **and** the upstream (both Python), so when its busy column is "
        "near 100 % the figure is the load side's limit, not the server's; the gateway's CPU per "
        "round trip does not depend on that. In (h) a round trip never leaves core 0, while in (i) "
        "it crosses to core 1 and back twice: the added latency at 1 socket includes those four "
        "cross-core wake-ups, as any proxy hop on another core would. At 1 socket every message "
        "also wakes an idle server, so its CPU per round trip is mostly that wake-up cost; the "
        f"{options.ws_sockets}-socket figure is the relay's own."
    )
    out.append("")
    out.append(
        "| path | sockets | round trips/s | p50 µs | p99 µs | max ms | server CPU µs/round trip "
        "| server CPU | client CPU | core 0 busy | others on core 1 | errors | note |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs.values():
        out.append(_ws_row(run.label, run.c50, _rounds_note(run)))
    for run in runs.values():
        out.append(_ws_row(run.label + ", 1 socket", run.c1, ""))
    out.append("")
    gw_http = _c50(results.tls_runs, "gw")
    ws_gw = _c50(runs, "ws-gw")
    out.append(f"- (i)/(h) round trips per second: {_f(rate_ratio(runs, 'ws-gw', 'ws-direct'), '.2f')}")
    if ws_gw is not None and gw_http is not None and ws_gw.cpu_us_per_req and gw_http.cpu_us_per_req:
        out.append(
            f"- gateway CPU: {ws_gw.cpu_us_per_req:.0f} µs per round trip (two messages relayed) vs "
            f"{gw_http.cpu_us_per_req:.0f} µs per proxied HTTP request ((c), same run): "
            f"{ws_gw.cpu_us_per_req / gw_http.cpu_us_per_req:.2f} ×"
        )
    out.append(
        f"- latency added per round trip at 1 socket (p50 (i) − p50 (h)): "
        f"{_f(p50_gap_us(runs, 'ws-gw', 'ws-direct'))} µs"
    )
    first_errors = {
        r.raw.get("first_error") for run in runs.values() for r in run.c50_rounds + run.c1_rounds
    } - {"", None}
    if first_errors:
        out.append(f"- errors seen: {'; '.join(sorted(str(e) for e in first_errors))}")
    out.append("")
    return out


def summary(results: Results) -> str:
    """A few lines for the terminal."""
    lines = ["", "Targets:"]
    for target in targets(results):
        lines.append(f"  {target.verdict:12} {target.what}: {target.measured}")
    lines.append("")
    lines.append("Headline: " + headline(results))
    return "\n".join(lines)
