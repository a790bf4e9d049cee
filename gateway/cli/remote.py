"""Remote mode of the command line: the same commands through a gateway's admin API.

Imports: services.views (the objects the commands print), explain (Trace), errors, aiohttp.

`RemoteDirectory` offers the methods of `services.Directory` that the commands call, over
HTTP with an admin token, so each command runs unchanged and prints the same output; the
audit actor is the admin (the API records it). Lists are read page by page to the end.
The admin token must never cross a network in clear: the URL is https:// unless its host
is loopback; TLS is verified (a private CA with --admin-ca-file) and redirects are refused
rather than followed (a redirect would carry the token elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from gateway.errors import Conflict, GatewayError, Invalid, NotFound, StoreUnavailable
from gateway.explain import Trace
from gateway.ratelimit import Limit, make_limit
from gateway.services.views import UNSET, AuditView, KeyView, RoleView, TokenView, Unset, UserView, limit_json
from gateway.timeparse import format_time, parse_time

_PAGE = 1000
_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)


class RemoteError(GatewayError):
    """The admin API refused or could not be reached; the message is its `detail`."""


@dataclass(frozen=True)
class AdminTarget:
    """Where the admin API is and how to reach it."""

    url: str
    token: str
    ca_file: str | None = None

    def __repr__(self) -> str:  # the token never shows in a traceback or log
        return f"AdminTarget(url={self.url!r})"


def check_admin_url(url: str) -> str:
    """`url` without a trailing slash; ValueError unless https://, or http:// to a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s):// URL of a gateway's admin listener")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r}: give the admin listener's base URL only (no query, fragment or user)")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(
            f"{url!r}: the admin token would cross the network in clear; use https:// "
            "(plain http:// only to a loopback address)"
        )
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _time(value: object) -> datetime | None:
    return None if value is None else parse_time(str(value))


def _required_time(value: object) -> datetime:
    return parse_time(str(value))


def _limit(value: Any) -> Limit | None:
    if value is None:
        return None
    return make_limit(value["rate"], value["per"], value.get("burst"))


def user_from_json(data: dict[str, Any]) -> UserView:
    """The view behind an admin API user object."""
    return UserView(
        name=data["name"],
        kind=data["kind"],
        description=data["description"],
        roles=tuple(
            RoleView(role["name"], role["assigned_by"], _required_time(role["assigned_at"]))
            for role in data["roles"]
        ),
        allowed_origins=tuple(data["allowed_origins"]),
        disabled=bool(data["disabled"]),
        rate_limit=_limit(data["rate_limit"]),
        created_at=_required_time(data["created_at"]),
        created_by=data["created_by"],
    )


def _credential(data: dict[str, Any]) -> dict[str, Any]:
    """The fields tokens and API keys share, as their views hold them."""
    return {
        "id": data["id"],
        "user": data["user"],
        "description": data["description"],
        "roles": None if data["roles"] is None else tuple(data["roles"]),
        "expires_at": _time(data["expires_at"]),
        "created_at": _required_time(data["created_at"]),
        "created_by": data["created_by"],
        "last_used_at": _time(data["last_used_at"]),
    }


def token_from_json(data: dict[str, Any]) -> TokenView:
    """The view behind an admin API token object."""
    return TokenView(name=data["name"], **_credential(data))


def key_from_json(data: dict[str, Any]) -> KeyView:
    """The view behind an admin API key object."""
    return KeyView(**_credential(data))


def audit_from_json(data: dict[str, Any]) -> AuditView:
    """The view behind an admin API audit event."""
    return AuditView(
        id=data["id"],
        at=_required_time(data["at"]),
        actor=data["actor"],
        action=data["action"],
        target=data["target"],
        detail=data["detail"],
    )


_ERRORS: dict[int, type[GatewayError]] = {404: NotFound, 409: Conflict, 503: StoreUnavailable}


class RemoteDirectory:
    """The Directory methods the commands use, through the admin API (one session per command)."""

    def __init__(self, target: AdminTarget) -> None:
        self._target = target
        context: ssl.SSLContext | bool = True
        if target.ca_file is not None:
            context = ssl.create_default_context(cafile=target.ca_file)
        self._session = aiohttp.ClientSession(
            timeout=_TIMEOUT,
            connector=aiohttp.TCPConnector(ssl=context),
            headers={"Authorization": f"Bearer {target.token}"},
        )

    async def close(self) -> None:
        """Close the connection."""
        await self._session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin API call: its JSON answer, or the API's refusal as a GatewayError."""
        where = self._target.url
        try:
            async with self._session.request(
                method, where + path, json=body, allow_redirects=False
            ) as answer:
                text = await answer.text()
                status = answer.status
        except aiohttp.ClientConnectorCertificateError as exc:
            problem = f"the certificate of {where} is not trusted ({exc.certificate_error})"
            raise RemoteError(problem) from None
        except ssl.SSLError as exc:
            raise RemoteError(f"TLS with {where} failed: {exc.reason or exc}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RemoteError(f"cannot reach the admin API at {where}: {type(exc).__name__}") from None
        if 300 <= status < 400:
            raise RemoteError(f"the admin API at {where} answered a redirect ({status}); not followed")
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        if status >= 400:
            detail = data.get("detail") if isinstance(data, dict) else None
            message = str(detail or f"the admin API answered {status}")
            if status == 422 and isinstance(data, dict):
                raise Invalid(str(data.get("field") or ""), message)
            raise _ERRORS.get(status, RemoteError)(message)
        return data

    async def _all(self, path: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Every item of a list, page by page (at most `limit` of them)."""
        found: list[dict[str, Any]] = []
        separator = "&" if "?" in path else "?"
        after: str | None = None
        while limit is None or len(found) < limit:
            size = _PAGE if limit is None else min(_PAGE, limit - len(found))
            page = await self.call(
                "GET", f"{path}{separator}limit={size}" + ("" if after is None else f"&after={after}")
            )
            found.extend(page["items"])
            after = page["next"]
            if after is None:
                break
        return found

    # -- users --------------------------------------------------------------------------

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
        """POST /v1/service-users."""
        if admin:
            raise RemoteError("admin identities are created with the local command line (it opens the store)")
        body: dict[str, Any] = {"name": name, "allowed_origins": list(origins)}
        if roles is not None:
            body["roles"] = list(roles)
        if description is not None:
            body["description"] = description
        if rate_limit is not None:
            body["rate_limit"] = limit_json(rate_limit)
        return user_from_json(await self.call("POST", "/v1/service-users", body))

    async def list_users(self, *, prefix: str | None = None, role: str | None = None) -> list[UserView]:
        """GET /v1/service-users, every page."""
        query = "&".join(
            f"{field}={quote(value, safe='')}"
            for field, value in (("prefix", prefix), ("role", role))
            if value
        )
        return [
            user_from_json(item)
            for item in await self._all("/v1/service-users" + (f"?{query}" if query else ""))
        ]

    async def get_user(self, name: str) -> UserView:
        """GET /v1/service-users/{name}."""
        return user_from_json(await self.call("GET", _user(name)))

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
        rate_limit: Limit | None | Unset = UNSET,
    ) -> UserView:
        """PATCH /v1/service-users/{name}; added and removed roles and origins become whole lists."""
        body: dict[str, Any] = {}
        if add_roles or remove_roles or add_origins or remove_origins:
            current = await self.get_user(name)
            if add_roles or remove_roles:
                kept = [role for role in current.role_names if role not in remove_roles]
                body["roles"] = sorted({*kept, *add_roles})
            if add_origins or remove_origins:
                origins = [origin for origin in current.allowed_origins if origin not in remove_origins]
                body["allowed_origins"] = [*origins, *(o for o in add_origins if o not in origins)]
        if not isinstance(description, Unset):
            body["description"] = description
        if disabled is not None:
            body["disabled"] = disabled
        if not isinstance(rate_limit, Unset):
            body["rate_limit"] = limit_json(rate_limit)
        return user_from_json(await self.call("PATCH", _user(name), body))

    async def delete_user(self, name: str, *, actor: str) -> None:
        """DELETE /v1/service-users/{name}."""
        await self.call("DELETE", _user(name))

    # -- tokens -------------------------------------------------------------------------

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
        """POST /v1/service-users/{user}/tokens: the token and its secret."""
        body = {"name": name, **_credential_body(description, expires_at, roles)}
        answer = await self.call("POST", _user(user) + "/tokens", body)
        return token_from_json(answer), str(answer["token"])

    async def list_tokens(self, user: str) -> list[TokenView]:
        """GET /v1/service-users/{user}/tokens, every page."""
        return [token_from_json(item) for item in await self._all(_user(user) + "/tokens")]

    async def reset_token(self, user: str, name: str, *, actor: str) -> tuple[TokenView, str]:
        """POST …/tokens/{name}/reset: the token and its new secret."""
        answer = await self.call("POST", _token(user, name) + "/reset")
        return token_from_json(answer), str(answer["token"])

    async def expire_token(self, user: str, name: str, *, actor: str) -> TokenView:
        """POST …/tokens/{name}/expire."""
        return token_from_json(await self.call("POST", _token(user, name) + "/expire"))

    async def delete_token(self, user: str, name: str, *, actor: str) -> None:
        """DELETE …/tokens/{name}."""
        await self.call("DELETE", _token(user, name))

    # -- API keys -----------------------------------------------------------------------

    async def create_key(
        self,
        user: str,
        *,
        actor: str,
        description: str | None = None,
        expires_at: datetime | None = None,
        roles: Sequence[str] | None = None,
    ) -> tuple[KeyView, str]:
        """POST /v1/service-users/{user}/keys: the key and its secret."""
        body = _credential_body(description, expires_at, roles)
        answer = await self.call("POST", _user(user) + "/keys", body)
        return key_from_json(answer), str(answer["secret"])

    async def list_keys(self, user: str) -> list[KeyView]:
        """GET /v1/service-users/{user}/keys, every page."""
        return [key_from_json(item) for item in await self._all(_user(user) + "/keys")]

    async def key_owner(self, key_id: str) -> str:
        """The user holding `key_id` (GET /v1/api-keys/{id})."""
        return str((await self.call("GET", f"/v1/api-keys/{quote(key_id, safe='')}"))["user"])

    async def expire_key(self, user: str, key_id: str, *, actor: str) -> KeyView:
        """POST …/keys/{id}/expire."""
        return key_from_json(await self.call("POST", _key(user, key_id) + "/expire"))

    async def delete_key(self, user: str, key_id: str, *, actor: str) -> None:
        """DELETE …/keys/{id}."""
        await self.call("DELETE", _key(user, key_id))

    # -- audit and explain --------------------------------------------------------------

    async def list_audit(
        self,
        *,
        actor: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        user: str | None = None,
    ) -> list[AuditView]:
        """GET /v1/audit-events: the newest `limit` events (paged)."""
        moment = None if since is None else format_time(since)
        found = await self._all("/v1/audit-events" + _query(actor=actor, since=moment, user=user), limit)
        return [audit_from_json(item) for item in found]

    async def explain(
        self, method: str, url: str, *, token: str | None, user: str | None, origin: str | None
    ) -> Trace:
        """POST /v1/authz/explain."""
        body: dict[str, Any] = {"method": method, "url": url}
        if token is not None:
            body["token"] = token
        if user is not None:
            body["user"] = user
        if origin is not None:
            body["origin"] = origin
        return Trace(await self.call("POST", "/v1/authz/explain", body))


def _query(**fields: str | None) -> str:
    """`?a=1&b=2` of the fields given (empty when none is)."""
    given = "&".join(f"{name}={quote(value, safe='')}" for name, value in fields.items() if value)
    return f"?{given}" if given else ""


def _user(name: str) -> str:
    return f"/v1/service-users/{quote(name, safe='')}"


def _token(user: str, name: str) -> str:
    return f"{_user(user)}/tokens/{quote(name, safe='')}"


def _key(user: str, key_id: str) -> str:
    return f"{_user(user)}/keys/{quote(key_id, safe='')}"


def _credential_body(
    description: str | None, expires_at: datetime | None, roles: Sequence[str] | None
) -> dict[str, Any]:
    """The optional fields a new token or key is created with (those given)."""
    body: dict[str, Any] = {}
    if description is not None:
        body["description"] = description
    if expires_at is not None:
        body["expires_at"] = format_time(expires_at)
    if roles is not None:
        body["roles"] = list(roles)
    return body
