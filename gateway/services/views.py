"""The service layer's results: frozen views whose ``to_json()`` is the admin API's objects (README).

Imports: timeparse, ratelimit. Absent values are null (never a missing key); times are UTC "...Z"
to the second. No view has a field for a token secret.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from gateway.ratelimit import Limit, format_period
from gateway.timeparse import format_time, utcnow

__all__ = ["UNSET", "AuditView", "RoleView", "TokenView", "Unset", "UserView", "limit_json"]


class Unset(enum.Enum):
    """Marker type for "argument not given" where None is a meaningful value."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def limit_json(limit: Limit | None) -> dict[str, object] | None:
    """A rate limit as the admin API shows it: `{"rate": 100, "per": "1s", "burst": 200}` (None: null)."""
    if limit is None:
        return None
    # `rate` is a float in Limit for the arithmetic, but only whole numbers are ever accepted.
    return {"rate": int(limit.rate), "per": format_period(limit.per), "burst": limit.burst}


@dataclass(frozen=True, slots=True)
class RoleView:
    """One role held by a user, with who granted it when."""

    name: str
    assigned_by: str
    assigned_at: datetime

    def to_json(self) -> dict[str, object]:
        """The `roles` item of the admin API's user object."""
        return {"name": self.name, "assigned_by": self.assigned_by, "assigned_at": _time(self.assigned_at)}


@dataclass(frozen=True, slots=True)
class UserView:
    """A service user or admin as the admin API shows it."""

    name: str
    kind: str
    description: str | None
    roles: tuple[RoleView, ...]
    allowed_origins: tuple[str, ...]
    disabled: bool
    rate_limit: Limit | None
    """The user's own rate limit; None = `rate_limits.per_user` (README "Rate limits")."""
    created_at: datetime
    created_by: str

    @property
    def href(self) -> str:
        """The user's admin API path."""
        return f"/v1/service-users/{self.name}"

    @property
    def role_names(self) -> tuple[str, ...]:
        """Role names, sorted."""
        return tuple(role.name for role in self.roles)

    def to_json(self) -> dict[str, object]:
        """The admin API's user object (absent values are null)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "href": self.href,
            "description": self.description,
            "roles": [role.to_json() for role in self.roles],
            "allowed_origins": list(self.allowed_origins),
            "disabled": self.disabled,
            "rate_limit": limit_json(self.rate_limit),
            "created_at": _time(self.created_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True, slots=True)
class TokenView:
    """A token as the admin API shows it; there is no field for the secret."""

    id: str
    name: str
    user: str
    description: str | None
    roles: tuple[str, ...] | None
    """None: the token follows the user's roles; else its fixed (sorted) roles."""
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    last_used_at: datetime | None

    def is_expired(self, now: datetime | None = None) -> bool:
        """True once `now` (default: the current time) has reached `expires_at`."""
        return _expired(self.expires_at, now)

    def to_json(self, now: datetime | None = None) -> dict[str, object]:
        """The admin API's token object (absent values are null)."""
        return {"id": self.id, "name": self.name, **_credential_json(self, now)}


@dataclass(frozen=True, slots=True)
class KeyView:
    """An API key as the admin API shows it; there is no field for the secret."""

    id: str
    user: str
    description: str | None
    roles: tuple[str, ...] | None
    """None: the key follows the user's roles; else its fixed (sorted) roles."""
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    last_used_at: datetime | None

    def is_expired(self, now: datetime | None = None) -> bool:
        """True once `now` (default: the current time) has reached `expires_at`."""
        return _expired(self.expires_at, now)

    def to_json(self, now: datetime | None = None) -> dict[str, object]:
        """The admin API's key object (absent values are null)."""
        return _credential_json(self, now)


def _expired(expires_at: datetime | None, now: datetime | None) -> bool:
    return expires_at is not None and (now or utcnow()) >= expires_at


def _credential_json(view: TokenView | KeyView, now: datetime | None) -> dict[str, object]:
    """The fields tokens and API keys share, as the admin API shows them."""
    return {
        "id": view.id,
        "user": view.user,
        "description": view.description,
        "roles": None if view.roles is None else list(view.roles),
        "expires_at": _time(view.expires_at),
        "expired": _expired(view.expires_at, now),
        "created_at": _time(view.created_at),
        "created_by": view.created_by,
        "last_used_at": _time(view.last_used_at),
    }


@dataclass(frozen=True, slots=True)
class AuditView:
    """One audit event; `detail` is JSON and never holds a secret."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, object]

    def to_json(self) -> dict[str, object]:
        """The admin API's audit event object."""
        return {
            "id": self.id,
            "at": _time(self.at),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
        }
