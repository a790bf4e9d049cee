"""/metrics of a real `gateway serve` (README "Metrics"): what a scrape holds, checked by promtool."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import IN_CI, write_config
from tests.process import children_of, serving


def sample(text: str, name: str) -> float:
    """The value of the sample written exactly as `name` (labels included) in a scrape."""
    for line in text.splitlines():
        found, _, value = line.rpartition(" ")
        if found == name:
            return float(value)
    raise AssertionError(f"no sample {name} in the scrape")


async def test_a_scrape_has_durations_in_flight_build_and_process_and_passes_promtool(
    tmp_path: Path, upstream: TestServer
) -> None:
    upstream_url = str(upstream.make_url("")).rstrip("/")
    config = write_config(tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=upstream_url)
    async with serving(config) as (process, token), aiohttp.ClientSession() as session:
        bearer = {"Authorization": f"Bearer {token}"}
        for _ in range(3):
            async with session.get(process.proxy + "/echo/a", headers=bearer) as allowed:
                assert allowed.status == 200
        async with session.get(process.proxy + "/echo/a") as refused:
            assert refused.status == 401
        async with session.get(process.admin + "/metrics") as scraped:
            text = await scraped.text()

    assert sample(text, 'gateway_request_duration_seconds_count{route="echo"}') == 4
    assert sample(text, 'gateway_request_duration_seconds_bucket{le="+Inf",route="echo"}') == 4
    assert sample(text, "gateway_requests_in_flight") == 0
    version = importlib.metadata.version("service-user-gateway")
    assert sample(text, f'gateway_build_info{{version="{version}"}}') == 1
    assert sample(text, "process_resident_memory_bytes") > 1_000_000
    assert sample(text, "process_cpu_seconds_total") > 0
    assert token not in text and "svc" not in text  # no user or credential in any label

    await _promtool(text)


async def _scrape(session: aiohttp.ClientSession, admin: str) -> str:
    async with session.get(admin + "/metrics") as scraped:
        assert scraped.status == 200
        return await scraped.text()


async def test_workers_share_one_scrape_that_keeps_a_dead_workers_counts(
    tmp_path: Path, upstream: TestServer
) -> None:
    upstream_url = str(upstream.make_url("")).rstrip("/")
    config = write_config(tmp_path, store_url="sqlite+aiosqlite:///gateway.db", upstream_url=upstream_url)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    sent = 40
    async with serving(config, workers=2, extra_env={"TMPDIR": str(scratch)}) as (process, token):
        bearer = {"Authorization": f"Bearer {token}"}
        # A new connection each time: SO_REUSEPORT spreads them over both workers by source port.
        for _ in range(sent):
            async with (
                aiohttp.ClientSession() as session,
                session.get(process.proxy + "/echo/a", headers=bearer) as allowed,
            ):
                assert allowed.status == 200
        async with aiohttp.ClientSession() as session:
            # Worker 1 writes its plain-int values (cache misses, in flight) once a second.
            await asyncio.sleep(1.5)
            text = await _scrape(session, process.admin)
            assert sample(text, 'gateway_requests_total{route="echo",status="200"}') == sent
            assert sample(text, 'gateway_request_duration_seconds_count{route="echo"}') == sent
            # Each worker has its own cache: one miss and one cached identity in each.
            assert sample(text, "gateway_token_cache_misses_total") == 2
            assert sample(text, "gateway_token_cache_hits_total") == sent - 2
            assert sample(text, "gateway_cached_identities") == 2
            assert sample(text, "gateway_requests_in_flight") == 0
            assert sample(text, "gateway_store_healthy") == 1
            version = importlib.metadata.version("service-user-gateway")
            assert sample(text, f'gateway_build_info{{version="{version}"}}') == 1
            assert sample(text, "process_cpu_seconds_total") > 0
            assert text.count("\nprocess_resident_memory_bytes ") == 1  # one sample: the sum
            await _promtool(text)

            # A worker that dies takes its gauges with it but not what it counted.
            workers = children_of(process.process.pid)
            assert len(workers) == 2
            memory = sample(text, "process_resident_memory_bytes")
            os.kill(max(workers), signal.SIGKILL)
            await asyncio.sleep(0.5)
            text = await _scrape(session, process.admin)
            assert sample(text, 'gateway_requests_total{route="echo",status="200"}') == sent
            assert sample(text, "gateway_cached_identities") == 1
            assert sample(text, "process_resident_memory_bytes") < memory
        assert [entry.name for entry in scratch.iterdir()] != []  # the directory is in use
    # Stopped: the parent removed its directory.
    await asyncio.sleep(0)
    for _ in range(100):
        if process.process.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert list(scratch.iterdir()) == []


async def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool (Debian's prometheus package) is needed to check the scrape"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    checked = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
