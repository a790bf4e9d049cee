"""`gateway user create/update --rate-limit`, `--no-rate-limit` and how `user get` shows the limit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.store.test_cli import Run, gateway, in_process, write_config


@pytest.fixture
def gw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """`main(argv)` in this process on a SQLite config (as test_cli's `gw`), for quick matrices."""
    return in_process(write_config(tmp_path / "conf"), capsys)


def rate_limit_line(text: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith("Rate limit:")]
    return line.removeprefix("Rate limit:").strip()


def test_set_show_keep_and_reset(gw: Run) -> None:
    created = gw("user", "create", "svc", "--roles", "reader", "--rate-limit", "100/1s:200")
    assert "Rate limit: 100/1s:200" in created.stdout.splitlines()
    assert rate_limit_line(gw("user", "get", "svc").stdout) == "100/1s:200"
    got = json.loads(gw("user", "get", "svc", "--format", "json").stdout)
    assert got["rate_limit"] == {"rate": 100, "per": "1s", "burst": 200}

    updated = gw("user", "update", "svc", "--rate-limit", "10/60s")
    assert rate_limit_line(updated.stdout) == "10/1m:10"  # the burst defaults to the rate
    gw("user", "update", "svc", "--description", "other change")
    assert rate_limit_line(gw("user", "get", "svc").stdout) == "10/1m:10"  # not given: kept

    reset = gw("user", "update", "svc", "--no-rate-limit")
    assert rate_limit_line(reset.stdout) == "default"
    assert json.loads(gw("user", "get", "svc", "--format", "json").stdout)["rate_limit"] is None
    listed = json.loads(gw("user", "list", "--format", "json").stdout)["items"]
    assert [user["rate_limit"] for user in listed] == [None]

    plain = gw("user", "create", "plain")
    assert not any(line.startswith("Rate limit") for line in plain.stdout.splitlines())
    assert rate_limit_line(gw("user", "get", "plain").stdout) == "default"

    events = json.loads(gw("audit", "list", "--format", "json").stdout)["items"]
    updates = [e["detail"] for e in events if e["action"] == "user.updated" and e["target"] == "user/svc"]
    assert updates == [{"rate_limit": None}, {"description": "other change"}, {"rate_limit": "10/1m:10"}]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("100", "is not a rate limit: write RATE/PERIOD[:BURST]"),
        ("100/1s:", "is not a rate limit"),
        ("0/1s", "rate: must be an integer from 1"),
        ("10/1d", "per: '1d' is not a period"),
        ("10/0s", "must be longer than zero"),
        ("10/25h", "per: '25h' is longer than a day"),
        ("10/1s:0", "burst: must be an integer from 1"),
        ("10/1.000000000001s", "too many decimals"),
    ],
)
def test_a_bad_spec_is_a_usage_error(gw: Run, spec: str, message: str) -> None:
    gw("user", "create", "svc")
    for args in (("user", "update", "svc"), ("user", "create", "other")):
        done = gw(*args, "--rate-limit", spec, expect=2)
        assert "--rate-limit" in done.stderr and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert [u["name"] for u in json.loads(gw("user", "list", "--format", "json").stdout)["items"]] == ["svc"]
    assert [e["action"] for e in json.loads(gw("audit", "list", "--format", "json").stdout)["items"]] == [
        "user.created"
    ]


def test_rate_limit_and_no_rate_limit_together_is_a_usage_error(gw: Run) -> None:
    gw("user", "create", "svc", "--rate-limit", "5/1s")
    done = gw("user", "update", "svc", "--rate-limit", "7/1s", "--no-rate-limit", expect=2)
    assert "give at most one of --rate-limit and --no-rate-limit" in done.stderr
    assert rate_limit_line(gw("user", "get", "svc").stdout) == "5/1s:5"
    assert (
        gw("user", "update", "ghost", "--no-rate-limit", expect=1).stderr == "error: user 'ghost' not found\n"
    )


def test_as_a_real_process_on_each_store(store_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "conf", store_url)

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = gateway(*args, "--config", str(config), cwd=tmp_path)
        assert done.returncode == expect, (done.stdout, done.stderr)
        return done

    run("user", "create", "svc")
    run("user", "update", "svc", "--rate-limit", "100/1s:200")
    assert json.loads(run("user", "get", "svc", "--format", "json").stdout)["rate_limit"] == {
        "rate": 100,
        "per": "1s",
        "burst": 200,
    }
    assert (
        "Error: Invalid value for '--rate-limit'"
        in run("user", "update", "svc", "--rate-limit", "x", expect=2).stderr
    )
    run("user", "update", "svc", "--no-rate-limit")
    assert rate_limit_line(run("user", "get", "svc").stdout) == "default"
