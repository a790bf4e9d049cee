#!/usr/bin/env bash
# Benchmark suite of the service-user gateway.
#
# Usage (as root, from anywhere; needs 2 cores and PostgreSQL at 127.0.0.1:5432, user
# postgres, database test, for the PostgreSQL figures):
#
#   bash bench/run.sh                    # everything (11-16 min); rewrites bench/RESULTS.md
#   bash bench/run.sh --quick            # short runs; writes bench/work/RESULTS.partial.md
#   bash bench/run.sh --only throughput  # or streaming, lookups, edge (comma-separated or repeated)
#   bash bench/run.sh --help             # every option (durations, sizes, --results, --keep)
#
# What it measures (see bench/RESULTS.md for the method and the latest figures):
#   throughput  wrk -t1 -c50 (core 0, with the nginx upstream) against (a) the upstream
#               direct, (b) nginx as a plain reverse proxy, (c) `gateway serve` on SQLite and
#               on a fresh PostgreSQL database, (d) bench/bare_proxy.py, each on core 1; then
#               -c1 for the added latency; then `gateway serve --workers 2` if it exists.
#   streaming   1 GB down and 1 GB up through the gateway (curl, bench/stream_upstream.py),
#               MB/s and the gateway's peak RSS.
#   lookups     Store.lookup_token at 1,000,000 tokens on SQLite and PostgreSQL, p50/p99.
#   edge        TLS termination: wrk https:// against the gateway (SQLite) and nginx, each with
#               a self-signed P-256 pair, and both again over plain HTTP in the same rounds;
#               WebSocket round trips (bench/ws_load.py, bench/ws_upstream.py) direct and
#               through the gateway on a `websocket: true` route.
#
# Separately: `python -m bench.revocation [--rounds N]` measures how fast a revocation reaches
# three instances on one PostgreSQL database, push (LISTEN/NOTIFY) against the poll alone;
# `python -m bench.profile` writes the per-stage table (µs of CPU per request by stage, from
# py-spy) into bench/RESULTS.md; bench/raw_proxy.py is the bare proxy on a bare asyncio
# protocol (the server side's upper bound, README "Performance").
#
# It installs Debian's nginx-light and wrk when missing, starts and stops every process by
# PID, sends traffic only to 127.0.0.1, and leaves nothing running.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
  echo "[bench] installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${need[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

if ! "$PYTHON" -c 'import aiohttp, sqlalchemy, asyncpg, aiosqlite, alembic, yaml, click, uvloop, hiredis' 2>/dev/null; then
  echo "[bench] installing the gateway's Python dependencies"
  "$PYTHON" -m pip install -q '.[fast]'
fi

# Run the bench in the background and wait, so that a signal to this script reaches it and
# its own cleanup (stop every process by PID, drop the PostgreSQL databases) runs.
bench_pid=""
cleanup() {
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m bench.run "$@" &
bench_pid=$!
status=0
wait "$bench_pid" || status=$?
bench_pid=""
exit "$status"
