"""How the command line shows things: aligned tables, "Key: value" blocks, JSON, the secret line.

Imports: services (views, the rate-limit rule), ratelimit, timeparse.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime

import click

from gateway.errors import Invalid
from gateway.ratelimit import Limit, format_spec, parse_spec
from gateway.services import AuditView, KeyView, TokenView, UserView, rate_limit_text
from gateway.timeparse import format_time, parse_time

# Wording of the OSMO CLI (seed 004), which operators may already grep for.
SECRET_NOTE = "Note: Save the token in a secure location as it will not be shown again"  # noqa: S105


def names(values: Iterable[str]) -> list[str]:
    """Comma-separated and/or repeated option values as one list (empty items dropped)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def cell(value: str | None) -> str:
    """A table cell; "-" when empty."""
    # Descriptions come from other people: keep terminal control sequences off the screen.
    return "".join(ch if ch.isprintable() else "?" for ch in value or "") or "-"


def when(moment: datetime | None) -> str:
    """A time for a table ("-" when absent)."""
    return "-" if moment is None else format_time(moment)


def expiry(moment: datetime | None) -> str:
    """An `expires_at` for people: "never" when absent.

    Not `when()`'s "-": a missing expiry line or an empty cell left newcomers wondering
    whether the token had no expiry or the CLI had dropped it (issue 15).
    """
    return "never" if moment is None else format_time(moment)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    cells = [[cell(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *cells]
    )


def emit_json(value: object) -> None:
    """Print `value` as indented JSON."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def role_list(roles: Sequence[str]) -> str:
    """Role names joined for a line of text."""
    return ", ".join(roles) if roles else "(none)"


def rate_limit_line(limit: Limit | None) -> str:
    """A user's own rate limit as RATE/PERIOD:BURST, or "default" (rate_limits.per_user applies)."""
    return "default" if limit is None else format_spec(limit)


def user_details(user: UserView) -> str:
    """A user as "Key: value" lines, roles one per line (after the OSMO CLI)."""
    lines = [
        f"Name:            {user.name}",
        f"Kind:            {user.kind}",
        f"Description:     {cell(user.description)}",
        f"Disabled:        {'yes' if user.disabled else 'no'}",
        f"Rate limit:      {rate_limit_line(user.rate_limit)}",
        f"Allowed origins: {', '.join(user.allowed_origins) or '-'}",
        f"Created at:      {format_time(user.created_at)}",
        f"Created by:      {cell(user.created_by)}",
        "Roles:" + ("" if user.roles else " (none)"),
    ]
    lines += [
        f"- {role.name} (assigned by {cell(role.assigned_by)} on {format_time(role.assigned_at)})"
        for role in user.roles
    ]
    return "\n".join(lines)


def users_table(users: Sequence[UserView]) -> str:
    """Users, one per row."""
    return table(
        ["NAME", "KIND", "ROLES", "ALLOWED ORIGINS", "DISABLED", "CREATED AT", "CREATED BY", "DESCRIPTION"],
        [
            [
                u.name,
                u.kind,
                ",".join(u.role_names),
                ",".join(u.allowed_origins),
                "yes" if u.disabled else "no",
                format_time(u.created_at),
                u.created_by,
                u.description or "",
            ]
            for u in users
        ],
    )


def tokens_table(tokens: Sequence[TokenView]) -> str:
    """Tokens, one per row (never a secret: views have none)."""
    return table(
        [
            "NAME",
            "ID",
            "ROLES",
            "EXPIRES AT",
            "STATUS",
            "LAST USED",
            "CREATED AT",
            "CREATED BY",
            "DESCRIPTION",
        ],
        [
            [
                t.name,
                t.id,
                "(user's roles)" if t.roles is None else ",".join(t.roles) or "(none)",
                expiry(t.expires_at),
                "expired" if t.is_expired() else "active",
                when(t.last_used_at),
                format_time(t.created_at),
                t.created_by,
                t.description or "",
            ]
            for t in tokens
        ],
    )


def keys_table(keys: Sequence[KeyView]) -> str:
    """API keys, one per row (never a secret: views have none)."""
    return table(
        ["ID", "ROLES", "EXPIRES AT", "STATUS", "LAST USED", "CREATED AT", "CREATED BY", "DESCRIPTION"],
        [
            [
                k.id,
                "(user's roles)" if k.roles is None else ",".join(k.roles) or "(none)",
                expiry(k.expires_at),
                "expired" if k.is_expired() else "active",
                when(k.last_used_at),
                format_time(k.created_at),
                k.created_by,
                k.description or "",
            ]
            for k in keys
        ],
    )


def audit_table(events: Sequence[AuditView]) -> str:
    """Audit events, one per row, detail as compact JSON."""
    return table(
        ["ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"],
        [
            [
                str(e.id),
                format_time(e.at),
                e.actor,
                e.action,
                e.target,
                json.dumps(e.detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
            ]
            for e in events
        ],
    )


def print_secret(secret: str) -> None:
    """The one and only time a secret is shown: a line of its own, on stdout."""
    click.echo(SECRET_NOTE)
    click.echo(f"Access token: {secret}")


class TimeType(click.ParamType[datetime]):
    """An ISO 8601 date or date-time (a date alone is 00:00 UTC, no zone is UTC)."""

    name = "DATE|DATETIME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        """Parse `value`, or fail as a usage error naming the expected forms."""
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RateLimitType(click.ParamType[Limit]):
    """`RATE/PERIOD[:BURST]` (`100/1s:200`, `10/1m`): a bad one is a usage error naming the problem."""

    name = "RATE/PERIOD[:BURST]"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Limit:
        """Parse `value`, or fail as a usage error (exit 2) with parse_spec's message."""
        if isinstance(value, Limit):
            return value
        try:
            limit = parse_spec(str(value))
            # The store's own rule too, so that it is refused here (exit 2) like any bad spec.
            rate_limit_text(limit)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        except Invalid as exc:
            self.fail(exc.message, param, ctx)
        return limit
