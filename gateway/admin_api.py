"""The admin REST API under /v1: request parsing, calls into `services.Directory`, JSON answers.

Imports: errors, services, timeparse, config (origins, route/role shapes), policy, store (Principal),
aiohttp. Every business rule lives in `services.Directory` (shared with the CLI); this module only
turns HTTP into typed arguments and views into the admin API's JSON.

Body rules: the body must be a JSON object sent as `application/json` (else 400 `bad_request`);
an unknown field or a value of the wrong type is 422 `invalid` naming the field. Strings holding
NUL or unpaired surrogates are refused (422) before they can reach the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Final, TypeVar

from aiohttp import web

from gateway.config import CorsConfig, RouteConfig, normalize_origin
from gateway.errors import BadRequest, Invalid, NotFound
from gateway.explain import explain_request, parse_target
from gateway.paging import BAD_CURSOR, Key, decode_cursor, encode_cursor, parse_limit
from gateway.policy import Role
from gateway.ratelimit import Limit, limit_problems, make_limit
from gateway.services import NAME_PATTERN, UNSET, TokenView, Unset, validate_name
from gateway.store import Principal
from gateway.timeparse import parse_time

if TYPE_CHECKING:
    from gateway.admin import AdminContext

__all__ = ["MAX_BODY_BYTES", "PRINCIPAL", "AdminApi"]

PRINCIPAL: Final = web.RequestKey("admin_principal", Principal)
"""The authenticated admin identity, set by the admin listener's middleware before a /v1 handler runs."""

MAX_BODY_BYTES: Final = 64 * 1024
MAX_DESCRIPTION: Final = 1024
MAX_ORIGIN: Final = 255  # the store's column width
MAX_LIST: Final = 100
RATE_LIMIT_KEYS: Final = ("rate", "per", "burst")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _clean(value: str, field: str) -> str:
    """`value` if the store can hold it (no NUL, valid UTF-8), else Invalid(field)."""
    if "\x00" in value:
        raise Invalid(field, f"{field} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(field, f"{field} must be valid Unicode text") from None
    return value


def _name(value: str, field: str = "name") -> str:
    """A user or token name (the service layer's grammar, matched on the whole string)."""
    validate_name(value, field)
    if NAME_PATTERN.fullmatch(value) is None:  # "$" also matches before a final line break
        raise Invalid(field, f"invalid name {value!r}: a name cannot end with a line break")
    return value


def _reject_constant(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:100]!r}")
        result[key] = value
    return result


async def read_object(request: web.Request) -> dict[str, object]:
    """The request body as a JSON object; BadRequest for another type, bad JSON or a non-object."""
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise BadRequest("send a JSON object with Content-Type: application/json")
    raw = await request.read()
    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


class Body:
    """The fields of one JSON object body, read one by one by type; unknown fields are refused."""

    def __init__(self, body: dict[str, object], allowed: tuple[str, ...]) -> None:
        for key in body:
            if key not in allowed:
                shown = key[:100]
                raise Invalid(shown, f"unknown field {shown!r}; allowed: {', '.join(allowed)}")
        self._body = body

    def __contains__(self, field: str) -> bool:
        return field in self._body

    def text(self, field: str, *, nullable: bool = True, max_length: int = MAX_DESCRIPTION) -> str | None:
        """A string (None when absent or null and `nullable`)."""
        value = self._body.get(field)
        if value is None:
            if not nullable:
                raise Invalid(field, f"{field} is required")
            return None
        if not isinstance(value, str):
            raise Invalid(field, f"{field} must be a string" + (" or null" if nullable else ""))
        if len(value) > max_length:
            raise Invalid(field, f"{field} must be at most {max_length} characters")
        return _clean(value, field)

    def strings(self, field: str, *, nullable: bool) -> list[str] | None:
        """A list of strings (None when absent, or null and `nullable`)."""
        if field not in self._body:
            return None
        value = self._body[field]
        if value is None and nullable:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise Invalid(field, f"{field} must be a list of strings" + (" or null" if nullable else ""))
        if len(value) > MAX_LIST:
            raise Invalid(field, f"{field} may hold at most {MAX_LIST} items")
        return [_clean(str(item), field) for item in value]

    def boolean(self, field: str) -> bool | None:
        """true or false (None when absent)."""
        if field not in self._body:
            return None
        value = self._body[field]
        if not isinstance(value, bool):
            raise Invalid(field, f"{field} must be true or false")
        return value

    def rate_limit(self, field: str) -> Limit | None:
        """`{"rate": 100, "per": "1s", "burst": 200}` (burst optional: the rate); None when absent or null.

        Invalid names the inner field (`rate_limit.per`) with make_limit's message.
        """
        value = self._body.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise Invalid(field, f"{field} must be an object {{rate, per, burst}} or null")
        for key in value:
            if key not in RATE_LIMIT_KEYS:
                shown = key[:100]
                raise Invalid(
                    f"{field}.{shown}", f"unknown field {shown!r}; allowed: {', '.join(RATE_LIMIT_KEYS)}"
                )
        per = value.get("per")
        if isinstance(per, str) and per != per.strip():
            # parse_period would strip it; the API takes exactly what its schema describes.
            raise Invalid(f"{field}.per", f"per: {per!r} must not have spaces around it")
        problems = limit_problems(value.get("rate"), per, value.get("burst"))
        if problems:
            name, problem = problems[0]  # one `field` per answer: the first
            raise Invalid(f"{field}.{name}", f"{name}: {problem if name in value else 'is required'}")
        return make_limit(value["rate"], per, value.get("burst"))

    def time(self, field: str) -> datetime | None:
        """An ISO 8601 date or date-time (None when absent or null)."""
        text = self.text(field)
        return None if text is None else parse_time_field(text, field)


def parse_time_field(text: str, field: str) -> datetime:
    """An ISO 8601 date or date-time (README "Command line"); Invalid(field) when it is not one."""
    problem = ""
    # RFC 3339 also allows a lower-case "t" and "z", which fromisoformat refuses.
    for candidate in (text, text.upper()):
        try:
            return parse_time(candidate)
        except ValueError as exc:
            problem = problem or str(exc)
        except OverflowError:
            problem = problem or f"{text[:60]!r} is out of range"
    raise Invalid(field, problem)


def origins(values: list[str] | None) -> list[str] | None:
    """Origins the store can hold (the service layer normalises and validates them again)."""
    if values is None:
        return None
    for value in values:
        try:
            normalised = normalize_origin(value)
        except ValueError as exc:
            raise Invalid("allowed_origins", str(exc)) from None
        if len(normalised) > MAX_ORIGIN:
            raise Invalid("allowed_origins", f"an origin may be at most {MAX_ORIGIN} characters long")
    return values


def query(request: web.Request, field: str) -> str | None:
    """One query parameter; an empty value counts as absent, a repeated one is refused."""
    values = request.query.getall(field, [])
    if len(values) > 1:
        raise Invalid(field, f"{field} may be given only once")
    if not values or values[0] == "":
        return None
    return _clean(values[0], field)


def path_name(request: web.Request, key: str, what: str) -> str:
    """A user or token name from the path; a name that cannot exist is simply not found."""
    value = request.match_info[key]
    if NAME_PATTERN.fullmatch(value) is None:
        raise NotFound(f"{what} not found (not a valid {what} name)")
    return value


def _key_id(request: web.Request) -> str:
    value = request.match_info["key"]
    if KEY_ID.fullmatch(value) is None:
        raise NotFound("API key not found (not a valid key id)")
    return value


KEY_ID = re.compile(r"key_[0-9A-Za-z]{16}")


def token_answer(view: TokenView, secret: str) -> dict[str, object]:
    """A create/reset answer: the token object plus its secret, shown this once."""
    return {**view.to_json(), "token": secret}


def secret_answer(body: dict[str, object], status: int = 200) -> web.Response:
    """An answer carrying a secret shown once: no cache, proxy or browser may keep it."""
    answer = web.json_response(body, status=status)
    answer.headers["Cache-Control"] = "no-store"
    return answer


def role_json(role: Role) -> dict[str, object]:
    """A `/v1/roles` item."""
    return {
        "name": role.name,
        "description": role.description,
        "permissions": list(role.permissions),
        "includes": list(role.includes),
    }


def cors_json(cors: CorsConfig | None) -> dict[str, object] | None:
    """A route's `cors` block as the admin API shows it."""
    if cors is None:
        return None
    return {
        "origins": {"store": cors.store, "extra": list(cors.extra)},
        "allow_headers": list(cors.allow_headers),
        "expose_headers": list(cors.expose_headers),
        "max_age": cors.max_age,
    }


def route_json(route: RouteConfig) -> dict[str, object]:
    """A `/v1/routes` item."""
    return {
        "name": route.name,
        "prefix": route.prefix,
        "upstream": route.upstream,
        "timeout": route.timeout,
        "strip_prefix": route.strip_prefix,
        "preserve_host": route.preserve_host,
        "cors": cors_json(route.cors),
    }


T = TypeVar("T")


def page_of(request: web.Request, shape: tuple[type, ...]) -> tuple[int, Key | None]:
    """The page a list request asks for: its size and the sort key it continues after."""
    limit = parse_limit(request.query.getall("limit", []))
    text = query(request, "after")
    return limit, None if text is None else decode_cursor(text, shape)


def page_answer(
    found: Sequence[T], limit: int, key: Callable[[T], Key], to_json: Callable[[T], dict[str, object]]
) -> web.Response:
    """`{"items": [...], "next": cursor | null}` from up to `limit + 1` rows found."""
    shown = found[:limit]
    after = encode_cursor(key(shown[-1])) if len(found) > limit else None
    return web.json_response({"items": [to_json(item) for item in shown], "next": after})


def only_params(known: tuple[str, ...], handler: Handler) -> Handler:
    """`handler`, refusing a request with a query parameter not in `known` (422 `invalid`)."""

    async def checked(request: web.Request) -> web.StreamResponse:
        unknown = sorted(set(request.query) - set(known))
        if unknown:
            allowed = ", ".join(known) if known else "none"
            raise Invalid(
                unknown[0], f"unknown query parameter {unknown[0]!r} (this endpoint takes: {allowed})"
            )
        return await handler(request)

    return checked


class AdminApi:
    """The /v1 handlers over one AdminContext; `routes()` lists (method, path, handler)."""

    def __init__(self, context: AdminContext) -> None:
        self._context = context
        self._directory = context.directory

    def routes(self) -> list[tuple[str, str, Handler]]:
        """Every /v1 endpoint (README "Admin listener and REST API"), each refusing query
        parameters it does not know (422 `invalid`: a misspelt filter must not list everything)."""
        user, token = "/v1/service-users/{name}", "/v1/service-users/{name}/tokens/{token}"
        key = "/v1/service-users/{name}/keys/{key}"
        paged = ("limit", "after")
        endpoints: list[tuple[str, str, Handler, tuple[str, ...]]] = [
            ("GET", "/v1/service-users", self.list_users, ("prefix", "role", *paged)),
            ("POST", "/v1/service-users", self.create_user, ()),
            ("GET", user, self.get_user, ()),
            ("PATCH", user, self.update_user, ()),
            ("DELETE", user, self.delete_user, ()),
            ("GET", user + "/tokens", self.list_tokens, paged),
            ("POST", user + "/tokens", self.create_token, ()),
            ("POST", token + "/reset", self.reset_token, ()),
            ("POST", token + "/expire", self.expire_token, ()),
            ("DELETE", token, self.delete_token, ()),
            ("GET", user + "/keys", self.list_keys, paged),
            ("POST", user + "/keys", self.create_key, ()),
            ("POST", key + "/expire", self.expire_key, ()),
            ("DELETE", key, self.delete_key, ()),
            ("GET", "/v1/api-keys/{key}", self.get_key, ()),
            ("GET", "/v1/roles", self.list_roles, paged),
            ("GET", "/v1/routes", self.list_routes, paged),
            ("GET", "/v1/audit-events", self.list_audit, ("actor", "since", "user", *paged)),
            ("POST", "/v1/authz/explain", self.explain, ()),
        ]
        return [(method, path, only_params(known, handler)) for method, path, handler, known in endpoints]

    async def _changed(self, user: str, *, origins: bool = True) -> None:
        # Awaited before answering, so the change applies on this instance (cached identities,
        # CORS origins) by the time the client sees the answer; other instances poll the feed.
        await self._context.changed(user, origins=origins)

    async def list_users(self, request: web.Request) -> web.Response:
        """GET /v1/service-users?prefix=&role=&limit=&after= (by name)."""
        prefix, role = query(request, "prefix"), query(request, "role")
        limit, after = page_of(request, (str,))
        users = await self._directory.list_users(
            prefix=prefix, role=role, after=None if after is None else str(after[0]), limit=limit + 1
        )
        return page_answer(users, limit, lambda view: (view.name,), lambda view: view.to_json())

    async def create_user(self, request: web.Request) -> web.Response:
        """POST /v1/service-users"""
        body = Body(
            await read_object(request), ("name", "description", "roles", "allowed_origins", "rate_limit")
        )
        name = _name(body.text("name", nullable=False) or "")
        description = body.text("description")
        roles = body.strings("roles", nullable=True)
        allowed = origins(body.strings("allowed_origins", nullable=True)) or []
        view = await self._directory.create_user(
            name,
            actor=request[PRINCIPAL].user,
            roles=roles,
            description=description,
            origins=allowed,
            rate_limit=body.rate_limit("rate_limit"),
        )
        await self._changed(name)
        return web.json_response(view.to_json(), status=201, headers={"Location": view.href})

    async def get_user(self, request: web.Request) -> web.Response:
        """GET /v1/service-users/{name}"""
        view = await self._directory.get_user(path_name(request, "name", "user"))
        return web.json_response(view.to_json())

    async def update_user(self, request: web.Request) -> web.Response:
        """PATCH /v1/service-users/{name}: given fields replace the old values (roles and origins whole)."""
        name = path_name(request, "name", "user")
        body = Body(
            await read_object(request), ("description", "roles", "allowed_origins", "disabled", "rate_limit")
        )
        description: str | None | Unset = body.text("description") if "description" in body else UNSET
        # Absent: unchanged; null: back to rate_limits.per_user.
        rate_limit: Limit | None | Unset = body.rate_limit("rate_limit") if "rate_limit" in body else UNSET
        view = await self._directory.update_user(
            name,
            actor=request[PRINCIPAL].user,
            description=description,
            roles=body.strings("roles", nullable=False),
            origins=origins(body.strings("allowed_origins", nullable=False)),
            disabled=body.boolean("disabled"),
            rate_limit=rate_limit,
        )
        await self._changed(name)
        return web.json_response(view.to_json())

    async def delete_user(self, request: web.Request) -> web.Response:
        """DELETE /v1/service-users/{name} (its tokens go with it)."""
        name = path_name(request, "name", "user")
        await self._directory.delete_user(name, actor=request[PRINCIPAL].user)
        await self._changed(name)
        return web.Response(status=204)

    async def list_tokens(self, request: web.Request) -> web.Response:
        """GET /v1/service-users/{name}/tokens?limit=&after= (by name)."""
        limit, after = page_of(request, (str,))
        views = await self._directory.list_tokens(
            path_name(request, "name", "user"),
            after=None if after is None else str(after[0]),
            limit=limit + 1,
        )
        return page_answer(views, limit, lambda view: (view.name,), lambda view: view.to_json())

    async def create_token(self, request: web.Request) -> web.Response:
        """POST /v1/service-users/{name}/tokens: 201 with the secret, shown this once."""
        user = path_name(request, "name", "user")
        body = Body(await read_object(request), ("name", "description", "expires_at", "roles"))
        name = _name(body.text("name", nullable=False) or "")
        view, secret = await self._directory.create_token(
            user,
            name,
            actor=request[PRINCIPAL].user,
            description=body.text("description"),
            expires_at=body.time("expires_at"),
            roles=body.strings("roles", nullable=True),
        )
        await self._changed(user, origins=False)
        return secret_answer(token_answer(view, secret), status=201)

    async def reset_token(self, request: web.Request) -> web.Response:
        """POST .../tokens/{token}/reset: same id, new secret (shown this once)."""
        user = path_name(request, "name", "user")
        token = path_name(request, "token", "token")
        view, secret = await self._directory.reset_token(user, token, actor=request[PRINCIPAL].user)
        await self._changed(user, origins=False)
        return secret_answer(token_answer(view, secret))

    async def expire_token(self, request: web.Request) -> web.Response:
        """POST .../tokens/{token}/expire: it stops working at once and stays listed."""
        user = path_name(request, "name", "user")
        token = path_name(request, "token", "token")
        view = await self._directory.expire_token(user, token, actor=request[PRINCIPAL].user)
        await self._changed(user, origins=False)
        return web.json_response(view.to_json())

    async def delete_token(self, request: web.Request) -> web.Response:
        """DELETE .../tokens/{token}"""
        user = path_name(request, "name", "user")
        token = path_name(request, "token", "token")
        await self._directory.delete_token(user, token, actor=request[PRINCIPAL].user)
        await self._changed(user, origins=False)
        return web.Response(status=204)

    async def list_keys(self, request: web.Request) -> web.Response:
        """GET /v1/service-users/{name}/keys?limit=&after= (oldest first)."""
        limit, after = page_of(request, (str, str))
        since: tuple[datetime, str] | None = None
        if after is not None:
            try:
                since = (datetime.fromisoformat(str(after[0])), str(after[1]))
            except ValueError:
                raise Invalid("after", BAD_CURSOR) from None
        views = await self._directory.list_keys(
            path_name(request, "name", "user"), after=since, limit=limit + 1
        )
        return page_answer(
            views, limit, lambda view: (view.created_at.isoformat(), view.id), lambda view: view.to_json()
        )

    async def create_key(self, request: web.Request) -> web.Response:
        """POST /v1/service-users/{name}/keys: 201 with the secret, shown this once."""
        user = path_name(request, "name", "user")
        body = Body(await read_object(request), ("description", "expires_at", "roles"))
        view, secret = await self._directory.create_key(
            user,
            actor=request[PRINCIPAL].user,
            description=body.text("description"),
            expires_at=body.time("expires_at"),
            roles=body.strings("roles", nullable=True),
        )
        await self._changed(user, origins=False)
        return secret_answer({**view.to_json(), "secret": secret}, status=201)

    async def expire_key(self, request: web.Request) -> web.Response:
        """POST .../keys/{key}/expire: tokens minted from it stop working at once."""
        user = path_name(request, "name", "user")
        view = await self._directory.expire_key(user, _key_id(request), actor=request[PRINCIPAL].user)
        await self._changed(user, origins=False)
        return web.json_response(view.to_json())

    async def delete_key(self, request: web.Request) -> web.Response:
        """DELETE .../keys/{key}"""
        user = path_name(request, "name", "user")
        await self._directory.delete_key(user, _key_id(request), actor=request[PRINCIPAL].user)
        await self._changed(user, origins=False)
        return web.Response(status=204)

    async def get_key(self, request: web.Request) -> web.Response:
        """GET /v1/api-keys/{key}: one key by its id, whoever holds it (its `user` names them)."""
        key_id = _key_id(request)
        owner = await self._directory.key_owner(key_id)
        for view in await self._directory.list_keys(owner):
            if view.id == key_id:
                return web.json_response(view.to_json())
        raise NotFound(f"API key {key_id} not found")

    async def list_roles(self, request: web.Request) -> web.Response:
        """GET /v1/roles?limit=&after=: the roles policies/ defines now, by name."""
        limit, after = page_of(request, (str,))
        roles = self._context.settings().table.roles
        names = [name for name in sorted(roles) if after is None or name > str(after[0])]
        return page_answer(
            names[: limit + 1], limit, lambda name: (name,), lambda name: role_json(roles[name])
        )

    async def list_routes(self, request: web.Request) -> web.Response:
        """GET /v1/routes?limit=&after=: the routes of the live configuration, in config order."""
        limit, after = page_of(request, (str,))
        routes = list(self._context.settings().config.routes)
        if after is not None:
            names = [route.name for route in routes]
            if after[0] not in names:  # a reload removed it: the order it continued is gone
                raise Invalid("after", "after names a route the configuration no longer has; start again")
            routes = routes[names.index(str(after[0])) + 1 :]
        return page_answer(routes[: limit + 1], limit, lambda route: (route.name,), route_json)

    async def list_audit(self, request: web.Request) -> web.Response:
        """GET /v1/audit-events?actor=&since=&user=&limit=&after= (newest first)."""
        actor = query(request, "actor")
        since_text = query(request, "since")
        since = None if since_text is None else parse_time_field(since_text, "since")
        limit, after = page_of(request, (int,))
        before = None if after is None else int(after[0])
        events = await self._directory.list_audit(
            actor=actor, since=since, limit=limit, before=before, peek=True, user=query(request, "user")
        )
        return page_answer(events, limit, lambda event: (event.id,), lambda event: event.to_json())

    async def explain(self, request: web.Request) -> web.Response:
        """POST /v1/authz/explain {method, url, user | token, origin}: the trace (README "Explain")."""
        body = Body(await read_object(request), ("method", "url", "user", "token", "origin"))
        method = body.text("method", nullable=False, max_length=32) or ""
        url = body.text("url", nullable=False, max_length=8192) or ""
        user = body.text("user", max_length=63)
        token = body.text("token", max_length=4096)
        if (user is None) == (token is None):
            raise Invalid("user" if user is None else "token", "give exactly one of user and token")
        target = parse_target(method, url, body.text("origin", max_length=2048))
        context = self._context
        trace = await explain_request(
            context.settings(),
            self._directory,
            context.credentials,  # as the proxy decides: gw_ tokens and access tokens
            context.origins,
            target,
            token=token,
            user=user,
        )
        return web.json_response(trace.to_json())
