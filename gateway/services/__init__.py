"""Service users, tokens and audit events: the one service layer under the CLI and the admin API.

Imports: store, models, tokens, config (origin normalisation), timeparse, errors.

Every mutation is one write transaction that also inserts its audit event and its
change-feed row (so another process that sees the change also sees the audit, and a
failed write leaves neither). Results are frozen views (``services.views``) whose
``to_json()`` gives exactly the admin API objects (README "Admin listener and REST API");
none of them ever holds a token secret (``create_token``/``reset_token`` hand it back separately, once).

Errors: Invalid (422, names the field), NotFound (404), Conflict (409),
StoreUnavailable (503); ConfigError when `policies` cannot load policies/.

Layout: ``base`` (rules, transactions, audit), ``users`` and ``tokens`` (the two halves
of `Directory`), ``views`` (results).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import or_, select

from gateway.errors import Invalid
from gateway.models import AuditEvent
from gateway.services.base import DEFAULT_ROLE, NAME_PATTERN, RoleGraph, rate_limit_text, validate_name
from gateway.services.keys import KeyOperations
from gateway.services.tokens import TokenOperations
from gateway.services.users import UserOperations
from gateway.services.views import UNSET, AuditView, KeyView, RoleView, TokenView, Unset, UserView
from gateway.timeparse import to_utc

__all__ = [
    "DEFAULT_ROLE",
    "MAX_AUDIT_LIMIT",
    "NAME_PATTERN",
    "UNSET",
    "AuditView",
    "Directory",
    "KeyView",
    "RoleGraph",
    "RoleView",
    "TokenView",
    "Unset",
    "UserView",
    "rate_limit_text",
    "validate_name",
]

MAX_AUDIT_LIMIT: Final = 1000


class Directory(UserOperations, TokenOperations, KeyOperations):
    """Service users, their roles, origins and tokens, with audit events and the change feed.

    `Directory(store, policies)`: `policies()` returns the live roles as a `RoleGraph` (the
    gateway passes its current `RouteTable`); it is called whenever roles are granted, given
    to a token or removed, so a reloaded policies/ applies at once. It may raise ConfigError
    (the CLI loads policies/ lazily).
    """

    async def list_audit(
        self,
        *,
        actor: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        before: int | None = None,
        peek: bool = False,
        user: str | None = None,
    ) -> list[AuditView]:
        """Audit events, newest first, optionally by `actor`, at or after `since`, and older
        than event `before` (the cursor of the page before); `peek` adds one more, which says
        whether another page follows. `user`: only events about that user, its tokens and keys."""
        if not 1 <= limit <= MAX_AUDIT_LIMIT:
            raise Invalid("limit", f"limit must be between 1 and {MAX_AUDIT_LIMIT}")
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1 if peek else limit)
        if before is not None:
            query = query.where(AuditEvent.id < before)
        if user is not None:
            # Names hold no "/", so these prefixes are the user's own targets and nobody else's.
            query = query.where(
                or_(
                    AuditEvent.target == f"user/{user}",
                    AuditEvent.target.startswith(f"token/{user}/", autoescape=True),
                    AuditEvent.target.startswith(f"key/{user}/", autoescape=True),
                )
            )
        if actor is not None:
            query = query.where(AuditEvent.actor == actor)
        if since is not None:
            query = query.where(AuditEvent.at >= to_utc(since))
        async with self._read() as session:
            rows = await session.scalars(query)
            return [
                AuditView(id=e.id, at=e.at, actor=e.actor, action=e.action, target=e.target, detail=e.detail)
                for e in rows
            ]
