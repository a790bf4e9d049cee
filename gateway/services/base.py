"""Shared machinery of the service layer: rules, row→view conversion, transactions, audit.

Imports: store, models, config (origin normalisation), ratelimit, timeparse, errors, services.views.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import normalize_origin
from gateway.errors import Invalid, NotFound
from gateway.models import AllowedOrigin, AuditEvent, RoleAssignment, ServiceUser, Token
from gateway.models import Change as ChangeRow
from gateway.ratelimit import Limit, format_spec, parse_spec
from gateway.services.views import RoleView, TokenView, UserView
from gateway.store import CHANGES_LOCK, Store, stored_limit, translate_errors
from gateway.timeparse import utcnow

NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_ROLE: Final = "service-user-project-admin"
ADMIN_NO_ROLES: Final = "admin identities hold no roles"
ADMIN_NO_ORIGINS: Final = "admin identities hold no allowed origins"


class RoleGraph(Protocol):
    """What the service layer needs from the live policies/ (a `policy.RouteTable` is one)."""

    def role_names(self) -> frozenset[str]:
        """Names of the roles policies/ defines."""
        ...

    def reachable(self, roles: Iterable[str]) -> frozenset[str]:
        """The role names in `roles` plus every role they reach through `includes`."""
        ...


def not_held(role: str, user: str) -> Invalid:
    """The error for a token role its user neither holds nor reaches through `includes`."""
    return Invalid("roles", f"role '{role}' is not held by user '{user}'")


def validate_name(name: str, field: str = "name") -> str:
    """`name` if it follows the user/token/role grammar, else Invalid(field)."""
    if not NAME_PATTERN.fullmatch(name):
        raise Invalid(
            field,
            f"invalid name {name!r}: use 1 to 63 characters a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return name


def as_list(values: Iterable[str], field: str) -> list[str]:
    """`values` as a list; a bare string (a likely slip: "a,b" for ["a", "b"]) is refused."""
    if isinstance(values, str):
        raise Invalid(field, "must be a list of strings, not one string")
    return list(values)


def normalize_origins(values: Iterable[str]) -> list[str]:
    """The distinct origins of `values`, normalised and sorted; Invalid("allowed_origins")."""
    normalised: set[str] = set()
    for value in as_list(values, "allowed_origins"):
        try:
            normalised.add(normalize_origin(value))
        except ValueError as exc:
            raise Invalid("allowed_origins", str(exc)) from None
    return sorted(normalised)


def rate_limit_text(limit: Limit | None) -> str | None:
    """`limit` as the store keeps it (`format_spec` text; None stays NULL).

    Invalid("rate_limit.per") for a period with more decimals than the text keeps (ten):
    stored rounded, it would silently be another limit.
    """
    if limit is None:
        return None
    text = format_spec(limit)
    try:
        stored = parse_spec(text)
    except ValueError:
        stored = None
    if stored != limit:
        raise Invalid("rate_limit.per", f"per: {limit.per!r} seconds has too many decimals; use at most ten")
    return text


def user_not_found(name: str) -> NotFound:
    """The error for a user that does not exist."""
    return NotFound(f"user '{name}' not found")


def token_not_found(user: str, name: str) -> NotFound:
    """The error for a token name the user does not have."""
    return NotFound(f"token '{name}' not found for user '{user}'")


def token_view(token: Token, user: str) -> TokenView:
    """The view of a token row of user `user`."""
    return TokenView(
        id=token.id,
        name=token.name,
        user=user,
        description=token.description,
        roles=None if token.roles is None else tuple(sorted(token.roles)),
        expires_at=token.expires_at,
        created_at=token.created_at,
        created_by=token.created_by,
        last_used_at=token.last_used_at,
    )


def user_view(user: ServiceUser, roles: Iterable[RoleAssignment], origins: Iterable[str]) -> UserView:
    """The view of a user row with its role rows and origins."""
    return UserView(
        name=user.name,
        kind=user.kind,
        description=user.description,
        roles=tuple(
            sorted((RoleView(r.role, r.assigned_by, r.assigned_at) for r in roles), key=lambda r: r.name)
        ),
        allowed_origins=tuple(sorted(origins)),
        disabled=user.disabled,
        rate_limit=stored_limit(user.rate_limit, user.name),
        created_at=user.created_at,
        created_by=user.created_by,
    )


class DirectoryBase:
    """State and helpers shared by the user and token operations of `Directory`.

    `policies` gives the live roles (names and `includes`); it is called whenever roles are
    granted, given to a token or removed, so a reloaded policies/ applies at once. It may
    raise ConfigError (the CLI loads policies/ lazily, so commands that need no roles keep
    working while policies/ is broken).
    """

    def __init__(self, store: Store, policies: Callable[[], RoleGraph]) -> None:
        self._store = store
        self._policies = policies

    @asynccontextmanager
    async def _write(self, conflict: str | None = None) -> AsyncIterator[AsyncSession]:
        async with translate_errors(conflict), self._store.write_sessions.begin() as session:
            yield session

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with translate_errors(), self._store.sessions() as session:
            yield session

    def _bytewise(self, column: Any) -> Any:
        """`column` compared and sorted byte by byte, on both databases: a page's `after` must
        mean the same as its order (PostgreSQL's default collation would not; SQLite's does)."""
        return column.collate("C") if self._store.dialect == "postgresql" else column

    def _check_defined(self, roles: Iterable[str], graph: RoleGraph | None = None) -> list[str]:
        """`roles` sorted and distinct, if policies/ defines each; else Invalid naming the first."""
        wanted = sorted(set(as_list(roles, "roles")))
        if not wanted:
            return wanted
        defined = (graph if graph is not None else self._policies()).role_names()
        for role in wanted:
            if role not in defined:
                raise Invalid("roles", f"role '{role}' is not defined in policies/")
        return wanted

    async def _user(self, session: AsyncSession, name: str, *, lock: bool = False) -> ServiceUser:
        query = select(ServiceUser).where(ServiceUser.name == name)
        if lock:
            # PostgreSQL: serialise mutations of one user (e.g. a token created with a role
            # that a concurrent update removes). SQLite already has a single writer.
            query = query.with_for_update()
        user = await session.scalar(query)
        if user is None:
            raise user_not_found(name)
        return user

    async def _token(self, session: AsyncSession, user: ServiceUser, name: str) -> Token:
        token = await session.scalar(select(Token).where(Token.user_id == user.id, Token.name == name))
        if token is None:
            raise token_not_found(user.name, name)
        return token

    async def _role_rows(self, session: AsyncSession, user_id: int) -> list[RoleAssignment]:
        return list(await session.scalars(select(RoleAssignment).where(RoleAssignment.user_id == user_id)))

    async def _origin_values(self, session: AsyncSession, user_id: int) -> list[str]:
        return list(
            await session.scalars(select(AllowedOrigin.origin).where(AllowedOrigin.user_id == user_id))
        )

    async def _record(
        self,
        session: AsyncSession,
        *,
        actor: str,
        action: str,
        target: str,
        detail: dict[str, object],
        user: str,
        token_id: str | None = None,
    ) -> None:
        """Append the audit event and the change-feed row; the last writes of a transaction."""
        await session.flush()
        if self._store.dialect == "postgresql":
            # Held to commit: change ids then become visible in increasing order, so a
            # poller's cursor never passes an id whose transaction has not committed yet.
            await session.execute(select(func.pg_advisory_xact_lock(CHANGES_LOCK)))
        now = utcnow()
        session.add(AuditEvent(at=now, actor=actor, action=action, target=target, detail=detail))
        session.add(ChangeRow(at=now, user_name=user, token_id=token_id))
        await session.flush()
