"""`gateway serve --workers auto`: one worker per core the process may use (its affinity mask,
capped by a cgroup v2 CPU quota), as nginx's `worker_processes auto`; gateway.cpus."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.cpus import available_cpus, cgroup_quota
from tests.conftest import write_config
from tests.process import children_of, serving


@pytest.mark.parametrize("pinned", [1, 2], ids=["one-core", "two-cores"])
async def test_auto_starts_one_worker_per_core_the_process_may_run_on(
    tmp_path: Path, upstream: TestServer, pinned: int
) -> None:
    cores = sorted(os.sched_getaffinity(0))[:pinned]
    if len(cores) < pinned or (cgroup_quota() or pinned) < pinned:
        pytest.skip(f"this machine lets the tests use fewer than {pinned} cores")  # CI has two
    config = write_config(
        tmp_path,
        store_url="sqlite+aiosqlite:///gateway.db",
        upstream_url=str(upstream.make_url("")).rstrip("/"),
    )
    async with serving(config, workers="auto", cpus=set(cores)) as (process, token):
        # One core: the single worker is the process itself; more: a supervisor and its workers.
        assert len(children_of(process.process.pid)) == (0 if pinned == 1 else pinned)
        bearer = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(process.proxy + "/echo/a", headers=bearer) as ok,
        ):
            assert ok.status == 200


def test_a_cgroup_quota_caps_the_count_and_rounds_up(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    for text, expected in (
        ("max 100000\n", None),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("100000 100000\n", 1),
        ("garbage\n", None),
        ("0 100000\n", None),
    ):
        cpu_max.write_text(text)
        assert cgroup_quota(cpu_max) == expected, text
        assert available_cpus(cpu_max) == min(affinity, expected or affinity), text
    assert cgroup_quota(tmp_path / "missing") is None  # cgroup v1 or not Linux: the affinity alone
    assert available_cpus(tmp_path / "missing") == affinity


def test_workers_refuses_zero_and_words_other_than_auto(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gateway.cli import cli

    for given, problem in (("0", "0 is not at least 1"), ("many", "'many' is neither a number nor auto")):
        result = CliRunner().invoke(cli, ["serve", "--workers", given])
        assert result.exit_code == 2 and problem in result.output, result.output
