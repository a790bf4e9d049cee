"""Service users: create, list, get, update (roles, origins, description, disabled, rate limit), delete.

Imports: services.base, services.views, models, errors, ratelimit, timeparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import Conflict, Invalid
from gateway.models import AllowedOrigin, ApiKey, RoleAssignment, ServiceUser, Token
from gateway.ratelimit import Limit
from gateway.services.base import (
    ADMIN_NO_ORIGINS,
    ADMIN_NO_ROLES,
    DEFAULT_ROLE,
    DirectoryBase,
    as_list,
    normalize_origins,
    rate_limit_text,
    user_view,
    validate_name,
)
from gateway.services.views import UNSET, Unset, UserView
from gateway.timeparse import utcnow


class UserOperations(DirectoryBase):
    """The service-user half of `Directory`."""

    async def create_user(
        self,
        name: str,
        *,
        actor: str,
        roles: Sequence[str] | None = None,
        description: str | None = None,
        origins: Sequence[str] = (),
        admin: bool = False,
        rate_limit: Limit | None = None,
    ) -> UserView:
        """Create a service user (default role DEFAULT_ROLE) or, with `admin`, an admin identity.

        `rate_limit` is the user's own limit; None follows `rate_limits.per_user`.
        """
        validate_name(name)
        limit_text = rate_limit_text(rate_limit)
        if admin:
            if roles:
                raise Invalid("roles", ADMIN_NO_ROLES)
            if origins:
                raise Invalid("allowed_origins", ADMIN_NO_ORIGINS)
            role_names: list[str] = []
        else:
            role_names = self._check_defined([DEFAULT_ROLE] if roles is None else roles)
        origin_values = normalize_origins(origins)
        now = utcnow()
        async with self._write(conflict=f"user '{name}' already exists") as session:
            if await session.scalar(select(exists().where(ServiceUser.name == name))):
                raise Conflict(f"user '{name}' already exists")
            user = ServiceUser(
                name=name,
                kind="admin" if admin else "service",
                description=description,
                disabled=False,
                rate_limit=limit_text,
                created_at=now,
                created_by=actor,
            )
            session.add(user)
            await session.flush()
            assignments = [
                RoleAssignment(user_id=user.id, role=role, assigned_by=actor, assigned_at=now)
                for role in role_names
            ]
            session.add_all(assignments)
            session.add_all(AllowedOrigin(user_id=user.id, origin=origin) for origin in origin_values)
            detail: dict[str, object] = {
                "kind": user.kind,
                "roles": role_names,
                "allowed_origins": origin_values,
                "description": description,
                "rate_limit": limit_text,
            }
            await self._record(
                session, actor=actor, action="user.created", target=f"user/{name}", detail=detail, user=name
            )
            return user_view(user, assignments, origin_values)

    async def list_users(
        self,
        *,
        prefix: str | None = None,
        role: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[UserView]:
        """Users sorted by name (bytewise), optionally those whose name starts with `prefix` /
        holding `role`; only names after `after`, at most `limit` of them (None: all)."""
        name = self._bytewise(ServiceUser.name)
        chosen = select(ServiceUser.id)
        if prefix:
            chosen = chosen.where(ServiceUser.name.startswith(prefix, autoescape=True))
        if role:
            chosen = chosen.where(
                exists().where(RoleAssignment.user_id == ServiceUser.id, RoleAssignment.role == role)
            )
        if after is not None:
            chosen = chosen.where(name > after)
        async with self._read() as session:
            if limit is None:
                users = list(await session.scalars(select(ServiceUser).where(ServiceUser.id.in_(chosen))))
                ids: Any = chosen
            else:
                # One read fixes the page; the roles and origins are read for exactly its users.
                page = select(ServiceUser).where(ServiceUser.id.in_(chosen)).order_by(name).limit(limit)
                users = list(await session.scalars(page))
                ids = [user.id for user in users]
            roles: dict[int, list[RoleAssignment]] = {}
            for row in await session.scalars(select(RoleAssignment).where(RoleAssignment.user_id.in_(ids))):
                roles.setdefault(row.user_id, []).append(row)
            origins: dict[int, list[str]] = {}
            for user_id, origin in await session.execute(
                select(AllowedOrigin.user_id, AllowedOrigin.origin).where(AllowedOrigin.user_id.in_(ids))
            ):
                origins.setdefault(user_id, []).append(origin)
        views = [user_view(u, roles.get(u.id, ()), origins.get(u.id, ())) for u in users]
        # Python's order is bytewise for these ASCII names, as the database's is here.
        return sorted(views, key=lambda view: view.name)

    async def get_user(self, name: str) -> UserView:
        """One user; NotFound("user 'x' not found")."""
        async with self._read() as session:
            user = await self._user(session, name)
            return user_view(
                user, await self._role_rows(session, user.id), await self._origin_values(session, user.id)
            )

    async def update_user(
        self,
        name: str,
        *,
        actor: str,
        add_roles: Sequence[str] = (),
        remove_roles: Sequence[str] = (),
        add_origins: Sequence[str] = (),
        remove_origins: Sequence[str] = (),
        description: str | None | Unset = UNSET,
        disabled: bool | None = None,
        roles: Sequence[str] | None = None,
        origins: Sequence[str] | None = None,
        rate_limit: Limit | None | Unset = UNSET,
    ) -> UserView:
        """Change a user; `roles`/`origins` replace the whole set (PATCH), the others are deltas.

        `rate_limit`: a Limit sets the user's own limit, None goes back to `rate_limits.per_user`,
        UNSET leaves it. A change is in the change feed like any other, so every gateway drops
        the user's cached identities and applies the new limit from its next request.

        When roles are removed, a token's (and an API key's) fixed roles list loses every role
        the user then neither holds nor reaches through `includes` (`_strip_fixed_roles`).
        Nothing changed: no audit event and no change-feed row.
        """
        add_roles, remove_roles = as_list(add_roles, "roles"), as_list(remove_roles, "roles")
        roles = None if roles is None else as_list(roles, "roles")
        if roles is not None and (add_roles or remove_roles):
            raise Invalid("roles", "give either the whole roles list or roles to add/remove, not both")
        if origins is not None and (add_origins or remove_origins):
            raise Invalid("allowed_origins", "give either the whole origins list or origins to add/remove")
        for role in sorted(set(add_roles) & set(remove_roles)):
            raise Invalid("roles", f"role '{role}' is both added and removed")
        added_origins, removed_origins = normalize_origins(add_origins), normalize_origins(remove_origins)
        for origin in sorted(set(added_origins) & set(removed_origins)):
            raise Invalid("allowed_origins", f"origin '{origin}' is both added and removed")
        replacement_origins = None if origins is None else normalize_origins(origins)
        limit_text = None if isinstance(rate_limit, Unset) else rate_limit_text(rate_limit)
        now = utcnow()
        async with self._write() as session:
            user = await self._user(session, name, lock=True)
            held = {row.role: row for row in await self._role_rows(session, user.id)}
            if roles is not None:
                target_roles = set(roles)
            else:
                target_roles = (set(held) | set(add_roles)) - set(remove_roles)
            current_origins = set(await self._origin_values(session, user.id))
            if replacement_origins is not None:
                target_origins = set(replacement_origins)
            else:
                target_origins = (current_origins | set(added_origins)) - set(removed_origins)
            if user.kind == "admin":
                if target_roles:
                    raise Invalid("roles", ADMIN_NO_ROLES)
                if target_origins:
                    raise Invalid("allowed_origins", ADMIN_NO_ORIGINS)
            # Roles already held may have left policies/; only newly granted ones must exist.
            granted = self._check_defined(target_roles - set(held))
            revoked = sorted(set(held) - target_roles)
            detail: dict[str, object] = {}
            if granted:
                detail["roles_added"] = granted
            if revoked:
                detail["roles_removed"] = revoked
                await session.execute(
                    delete(RoleAssignment).where(
                        RoleAssignment.user_id == user.id, RoleAssignment.role.in_(revoked)
                    )
                )
                stripped, key_stripped = await self._strip_fixed_roles(session, user.id, target_roles)
                if stripped:
                    detail["token_roles_removed"] = stripped
                if key_stripped:
                    detail["key_roles_removed"] = key_stripped
            new_rows = [
                RoleAssignment(user_id=user.id, role=role, assigned_by=actor, assigned_at=now)
                for role in granted
            ]
            session.add_all(new_rows)
            origins_added = sorted(target_origins - current_origins)
            origins_removed = sorted(current_origins - target_origins)
            if origins_added:
                detail["origins_added"] = origins_added
                session.add_all(AllowedOrigin(user_id=user.id, origin=o) for o in origins_added)
            if origins_removed:
                detail["origins_removed"] = origins_removed
                await session.execute(
                    delete(AllowedOrigin).where(
                        AllowedOrigin.user_id == user.id, AllowedOrigin.origin.in_(origins_removed)
                    )
                )
            if not isinstance(description, Unset) and description != user.description:
                user.description = description
                detail["description"] = description
            if disabled is not None and disabled != user.disabled:
                user.disabled = disabled
                detail["disabled"] = disabled
            if not isinstance(rate_limit, Unset) and limit_text != user.rate_limit:
                user.rate_limit = limit_text
                detail["rate_limit"] = limit_text  # the spec text; null: back to the default
            if detail:
                await self._record(
                    session,
                    actor=actor,
                    action="user.updated",
                    target=f"user/{name}",
                    detail=detail,
                    user=name,
                )
            kept = [row for role, row in held.items() if role not in revoked]
            return user_view(user, kept + new_rows, target_origins)

    async def _strip_fixed_roles(
        self, session: AsyncSession, user_id: int, remaining: set[str]
    ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Drop from the fixed roles lists of the user's tokens and API keys every role the user
        no longer holds or reaches through `includes` with `remaining`; (token name → roles
        dropped, key id → roles dropped).

        Dropped for good: granting the role again later does not give it back to the list.
        """
        tokens = list(
            await session.scalars(
                select(Token).where(Token.user_id == user_id, Token.roles.is_not(None)).order_by(Token.name)
            )
        )
        keys = list(
            await session.scalars(
                select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.roles.is_not(None)).order_by(ApiKey.id)
            )
        )
        if not tokens and not keys:
            return {}, {}  # policies/ is not needed (nor loaded, in the CLI)
        reach = self._policies().reachable(remaining)
        stripped_tokens = {token.name: gone for token in tokens if (gone := _strip(token, reach))}
        stripped_keys = {key.id: gone for key in keys if (gone := _strip(key, reach))}
        return stripped_tokens, stripped_keys

    async def delete_user(self, name: str, *, actor: str) -> None:
        """Delete a user and its tokens; one user.deleted event lists the tokens that went."""
        async with self._write() as session:
            user = await self._user(session, name, lock=True)
            token_names = list(
                await session.scalars(select(Token.name).where(Token.user_id == user.id).order_by(Token.name))
            )
            # Roles, origins and tokens go by ON DELETE CASCADE.
            await session.execute(delete(ServiceUser).where(ServiceUser.id == user.id))
            await self._record(
                session,
                actor=actor,
                action="user.deleted",
                target=f"user/{name}",
                detail={"tokens": token_names},
                user=name,
            )


def _strip(row: Token | ApiKey, reach: frozenset[str]) -> list[str]:
    """Remove from `row`'s fixed roles those outside `reach`; the roles removed, sorted."""
    current = list(row.roles or [])
    gone = sorted(role for role in set(current) if role not in reach)
    if gone:
        # A new list object, so the ORM sees the JSON column change.
        row.roles = [role for role in current if role in reach]
    return gone
