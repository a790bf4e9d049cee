"""Times in and out (CONTRACT.md "Times"), and the --config argv preprocessing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.cli import UsageProblem, split_config_option
from gateway.timeparse import format_time, parse_time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2027-01-01", datetime(2027, 1, 1, tzinfo=UTC)),
        ("2027-01-01T12:30:00", datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
        ("2027-01-01T12:30:00Z", datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
        ("2027-01-01 12:30", datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
        ("2027-01-01T14:30:00+02:00", datetime(2027, 1, 1, 12, 30, tzinfo=UTC)),
        (" 2027-01-01T00:00:00.5Z ", datetime(2027, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["", "tomorrow", "2027-13-01", "2027-01-01T25:00", "01/02/2027"])
def test_parse_time_rejects_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time(text)


def test_format_time_is_utc_z_seconds() -> None:
    moment = datetime(2026, 1, 1, 2, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(moment) == "2026-01-01T00:00:00Z"
    assert format_time(datetime(2026, 1, 1)) == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("argv", "path", "rest"),
    [
        (["user", "list"], None, ["user", "list"]),
        (["--config", "a.yaml", "user", "list"], "a.yaml", ["user", "list"]),
        (["user", "list", "--config", "a.yaml"], "a.yaml", ["user", "list"]),
        (["user", "--config=a.yaml", "list"], "a.yaml", ["user", "list"]),
        (["user", "get", "--", "--config", "x"], None, ["user", "get", "--", "--config", "x"]),
    ],
)
def test_split_config_option(argv: list[str], path: str | None, rest: list[str]) -> None:
    assert split_config_option(argv) == (path, rest)


@pytest.mark.parametrize(
    "argv", [["--config"], ["user", "list", "--config"], ["--config="], ["--config", "--x"]]
)
def test_split_config_option_needs_a_path(argv: list[str]) -> None:
    with pytest.raises(UsageProblem):
        split_config_option(argv)
