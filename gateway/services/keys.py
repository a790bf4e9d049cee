"""API keys of a user: create, list, expire, delete (the secret is returned once, never stored).

Imports: services.base, services.views, tokens, models, errors, timeparse.

A key is exchanged at the token endpoint for short-lived JWTs (README "API keys and
short-lived tokens"). Every mutation writes a change-feed row naming the key, so open
JWTs minted from it stop working within a second on every instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import tokens
from gateway.errors import Invalid, NotFound
from gateway.models import ApiKey, ServiceUser
from gateway.services.base import DirectoryBase, not_held
from gateway.services.views import KeyView
from gateway.timeparse import format_time, to_utc, utcnow


def key_view(key: ApiKey, user: str) -> KeyView:
    """The view of a key row of user `user`."""
    return KeyView(
        id=key.id,
        user=user,
        description=key.description,
        roles=None if key.roles is None else tuple(sorted(key.roles)),
        expires_at=key.expires_at,
        created_at=key.created_at,
        created_by=key.created_by,
        last_used_at=key.last_used_at,
    )


class KeyOperations(DirectoryBase):
    """The API-key part of `Directory`."""

    async def create_key(
        self,
        user: str,
        *,
        actor: str,
        description: str | None = None,
        expires_at: datetime | None = None,
        roles: Sequence[str] | None = None,
    ) -> tuple[KeyView, str]:
        """Create a key; returns (view, secret). The secret is not stored and never shown again."""
        now = utcnow()
        if expires_at is not None:
            expires_at = to_utc(expires_at)
            if expires_at <= now:
                raise Invalid("expires_at", f"expires_at {format_time(expires_at)} is not in the future")
        graph = self._policies() if roles else None
        fixed = None if roles is None else self._check_defined(roles, graph)
        async with self._write() as session:
            owner = await self._user(session, user, lock=True)
            if owner.kind != "service":
                raise Invalid("user", f"'{user}' is an admin identity: only service users hold API keys")
            if graph is not None and fixed:
                reach = graph.reachable(row.role for row in await self._role_rows(session, owner.id))
                for role in fixed:
                    if role not in reach:
                        raise not_held(role, user)
            secret = tokens.generate(tokens.KEY_PREFIX)
            key = ApiKey(
                id=tokens.new_key_id(),
                user_id=owner.id,
                description=description,
                digest=tokens.digest(secret),
                expires_at=expires_at,
                roles=fixed,
                created_at=now,
                created_by=actor,
                last_used_at=None,
            )
            session.add(key)
            await self._record(
                session,
                actor=actor,
                action="key.created",
                target=f"key/{user}/{key.id}",
                detail={
                    "key_id": key.id,
                    "roles": fixed,
                    "expires_at": None if expires_at is None else format_time(expires_at),
                    "description": description,
                },
                user=user,
                token_id=key.id,
            )
            return key_view(key, user), secret

    async def list_keys(
        self, user: str, *, after: tuple[datetime, str] | None = None, limit: int | None = None
    ) -> list[KeyView]:
        """The user's keys, oldest first (never a secret); only those after `after` (a key's
        creation time and id), at most `limit` (None: all)."""
        key_id = self._bytewise(ApiKey.id)
        query = select(ApiKey).order_by(ApiKey.created_at, key_id).limit(limit)
        if after is not None:
            created, last = after
            query = query.where(
                or_(ApiKey.created_at > created, and_(ApiKey.created_at == created, key_id > last))
            )
        async with self._read() as session:
            owner = await self._user(session, user)
            rows = await session.scalars(query.where(ApiKey.user_id == owner.id))
            return [key_view(key, user) for key in rows]

    async def key_owner(self, key_id: str) -> str:
        """The name of the user holding `key_id` (NotFound when no user does)."""
        async with self._read() as session:
            owner = select(ServiceUser.name).join(ApiKey, ApiKey.user_id == ServiceUser.id)
            name = await session.scalar(owner.where(ApiKey.id == key_id))
        if name is None:
            raise NotFound(f"API key '{key_id}' not found")
        return name

    async def expire_key(self, user: str, key_id: str, *, actor: str) -> KeyView:
        """Make the key expire now ("Expire now"): tokens minted from it stop working at once."""
        now = utcnow()
        async with self._write() as session:
            key = await self._key(session, await self._user(session, user, lock=True), key_id)
            if key.expires_at is None or key.expires_at > now:
                key.expires_at = now
                await self._record(
                    session,
                    actor=actor,
                    action="key.expired",
                    target=f"key/{user}/{key_id}",
                    detail={"key_id": key_id, "expires_at": format_time(now)},
                    user=user,
                    token_id=key_id,
                )
            return key_view(key, user)

    async def delete_key(self, user: str, key_id: str, *, actor: str) -> None:
        """Delete a key; its secret and every token minted from it stop working at once."""
        async with self._write() as session:
            key = await self._key(session, await self._user(session, user, lock=True), key_id)
            await session.execute(delete(ApiKey).where(ApiKey.id == key.id))
            await self._record(
                session,
                actor=actor,
                action="key.deleted",
                target=f"key/{user}/{key_id}",
                detail={"key_id": key_id},
                user=user,
                token_id=key_id,
            )

    async def _key(self, session: AsyncSession, user: ServiceUser, key_id: str) -> ApiKey:
        key = await session.scalar(select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.id == key_id))
        if key is None:
            raise NotFound(f"API key '{key_id}' not found for user '{user.name}'")
        return key
