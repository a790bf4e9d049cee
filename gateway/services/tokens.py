"""Tokens of a user: issue, list, reset, expire, delete (the secret is returned once, never stored).

Imports: services.base, services.views, tokens, models, errors, timeparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, exists, select

from gateway import tokens
from gateway.errors import Conflict, Invalid
from gateway.models import Token
from gateway.services.base import DirectoryBase, not_held, token_view, validate_name
from gateway.services.views import TokenView
from gateway.timeparse import format_time, to_utc, utcnow


class TokenOperations(DirectoryBase):
    """The token half of `Directory`."""

    async def create_token(
        self,
        user: str,
        name: str,
        *,
        actor: str,
        description: str | None = None,
        expires_at: datetime | None = None,
        roles: Sequence[str] | None = None,
    ) -> tuple[TokenView, str]:
        """Issue a token; returns (view, secret). The secret is not stored and never shown again.

        `roles` (None: follow the user's roles) may name any role policies/ defines that the
        user holds or reaches through `includes`; the proxy intersects the list with what the
        user holds or reaches at each request (README "Command line").
        """
        validate_name(name)
        now = utcnow()
        if expires_at is not None:
            expires_at = to_utc(expires_at)
            if expires_at <= now:
                raise Invalid("expires_at", f"expires_at {format_time(expires_at)} is not in the future")
        # One version of policies/ for both checks, even if a reload lands in between.
        graph = self._policies() if roles else None
        fixed = None if roles is None else self._check_defined(roles, graph)
        conflict = f"token '{name}' already exists for user '{user}'"
        async with self._write(conflict=conflict) as session:
            owner = await self._user(session, user, lock=True)
            if graph is not None and fixed:
                held = [row.role for row in await self._role_rows(session, owner.id)]
                reach = graph.reachable(held)
                for role in fixed:
                    if role not in reach:
                        raise not_held(role, user)
            taken = exists().where(Token.user_id == owner.id, Token.name == name)
            if await session.scalar(select(taken)):
                raise Conflict(conflict)
            secret = tokens.generate()
            token = Token(
                id=tokens.new_token_id(),
                user_id=owner.id,
                name=name,
                description=description,
                digest=tokens.digest(secret),
                expires_at=expires_at,
                roles=fixed,
                created_at=now,
                created_by=actor,
                last_used_at=None,
            )
            session.add(token)
            detail: dict[str, object] = {
                "token_id": token.id,
                "roles": fixed,
                "expires_at": None if expires_at is None else format_time(expires_at),
                "description": description,
            }
            await self._record(
                session,
                actor=actor,
                action="token.created",
                target=f"token/{user}/{name}",
                detail=detail,
                user=user,
                token_id=token.id,
            )
            return token_view(token, user), secret

    async def list_tokens(
        self, user: str, *, after: str | None = None, limit: int | None = None
    ) -> list[TokenView]:
        """The user's tokens sorted by name (never a secret); only names after `after`, at most
        `limit` (None: all)."""
        name = self._bytewise(Token.name)
        query = select(Token).order_by(name).limit(limit)
        if after is not None:
            query = query.where(name > after)
        async with self._read() as session:
            owner = await self._user(session, user)
            rows = await session.scalars(query.where(Token.user_id == owner.id))
            return [token_view(token, user) for token in rows]

    async def reset_token(self, user: str, name: str, *, actor: str) -> tuple[TokenView, str]:
        """A new secret for the same token (same id, roles, expiry); the old secret stops working."""
        async with self._write() as session:
            token = await self._token(session, await self._user(session, user, lock=True), name)
            secret = tokens.generate()
            token.digest = tokens.digest(secret)
            await self._record(
                session,
                actor=actor,
                action="token.reset",
                target=f"token/{user}/{name}",
                detail={"token_id": token.id},
                user=user,
                token_id=token.id,
            )
            return token_view(token, user), secret

    async def expire_token(self, user: str, name: str, *, actor: str) -> TokenView:
        """Make the token expire now (kept and listed as expired); no-op if it already has."""
        now = utcnow()
        async with self._write() as session:
            token = await self._token(session, await self._user(session, user, lock=True), name)
            if token.expires_at is None or token.expires_at > now:
                token.expires_at = now
                await self._record(
                    session,
                    actor=actor,
                    action="token.expired",
                    target=f"token/{user}/{name}",
                    detail={"token_id": token.id, "expires_at": format_time(now)},
                    user=user,
                    token_id=token.id,
                )
            return token_view(token, user)

    async def delete_token(self, user: str, name: str, *, actor: str) -> None:
        """Delete a token; its secret stops working at once."""
        async with self._write() as session:
            token = await self._token(session, await self._user(session, user, lock=True), name)
            await session.execute(delete(Token).where(Token.id == token.id))
            await self._record(
                session,
                actor=actor,
                action="token.deleted",
                target=f"token/{user}/{name}",
                detail={"token_id": token.id},
                user=user,
                token_id=token.id,
            )
