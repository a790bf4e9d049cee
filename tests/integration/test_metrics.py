"""/metrics of a real `gateway serve` (README "Metrics"): what a scrape holds, checked by promtool."""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import IN_CI, write_config
from tests.process import serving


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
