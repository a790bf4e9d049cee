"""The OpenAPI 3.1 description of the admin listener, as a plain dict (served at /openapi.json).

Imports: admin_api (limits), errors (refusal codes), ratelimit (number bounds), services (name grammar,
audit limit). Pure data.

The schemas are exact (every key required, no extra keys, absent values `null`), so a
contract test can check every answer against them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from gateway.admin_api import MAX_BODY_BYTES, MAX_DESCRIPTION, MAX_LIST, MAX_ORIGIN
from gateway.errors import Refusal
from gateway.paging import DEFAULT_PAGE, MAX_CURSOR, MAX_PAGE
from gateway.ratelimit import MAX_COUNT as MAX_RATE_COUNT
from gateway.ratelimit import PERIOD_PATTERN
from gateway.services import NAME_PATTERN

JSONObject = dict[str, object]

REF: Final = "#/components/schemas/"
# Refusal's codes (the proxy's ones never occur here but keep one closed list) and aiohttp's 405.
ERROR_CODES: Final = [code.value for code in Refusal]
_KINDS: Final = ("user.created", "user.updated", "user.deleted")
ACTIONS: Final = [
    *_KINDS,
    "token.created",
    "token.reset",
    "token.expired",
    "token.deleted",
    "key.created",
    "key.expired",
    "key.deleted",
    "signing_key.rotated",
    "signing_key.revoked",
]


def _ref(name: str) -> JSONObject:
    return {"$ref": REF + name}


def _nullable(schema: JSONObject) -> JSONObject:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, JSONObject], required: list[str] | None = None) -> JSONObject:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _strings(**extra: object) -> JSONObject:
    return {"type": "array", "items": {"type": "string", **extra}}


_NAME: Final[JSONObject] = {"type": "string", "pattern": NAME_PATTERN.pattern}
_TIME: Final[JSONObject] = {"type": "string", "format": "date-time", "pattern": "Z$"}
_TEXT: Final[JSONObject] = {"type": "string", "maxLength": MAX_DESCRIPTION}

_TOKEN_FIELDS: Final[dict[str, JSONObject]] = {
    "id": {"type": "string"},
    "name": _NAME,
    "user": _NAME,
    "description": _nullable({"type": "string"}),
    "roles": _nullable(
        {
            **_strings(),
            "description": "null: follows the user's roles; else the token's own list, of which it "
            "carries what the user holds or reaches through includes at each request",
        }
    ),
    "expires_at": _nullable(_TIME),
    "expired": {"type": "boolean"},
    "created_at": _TIME,
    "created_by": {"type": "string"},
    "last_used_at": _nullable(_TIME),
}

_COUNT: Final[JSONObject] = {"type": "integer", "minimum": 1, "maximum": MAX_RATE_COUNT}
_PERIOD: Final[JSONObject] = {
    "type": "string",
    "pattern": PERIOD_PATTERN,
    "description": "a number with s, m or h (1s, 30s, 1m, 1h), at most 24h",
}
_RATE_LIMIT: Final[JSONObject] = {
    **_object(
        {
            "rate": {**_COUNT, "description": "requests per period"},
            "per": {"type": "string", "description": "the period: a number with s, m or h"},
            "burst": {**_COUNT, "description": "requests at once, from idle"},
        }
    ),
    "description": "a user's own rate limit (all routes together); a user without one (null) "
    "follows rate_limits.per_user",
}
_RATE_LIMIT_INPUT: Final[JSONObject] = _nullable(
    {
        **_object(
            {
                "rate": {**_COUNT, "description": "requests per period"},
                "per": _PERIOD,
                "burst": _nullable({**_COUNT, "description": "requests at once, from idle; null: the rate"}),
            },
            required=["rate", "per"],
        ),
        "description": "the user's own rate limit (all routes together); null: rate_limits.per_user",
    }
)

_KEY_ID: Final = "^key_[0-9A-Za-z]{16}$"
_KEY_FIELDS: Final[dict[str, JSONObject]] = {
    **{name: schema for name, schema in _TOKEN_FIELDS.items() if name != "name"},
    "id": {"type": "string", "pattern": _KEY_ID, "description": "the client_id of the token exchange"},
}

SCHEMAS: Final[dict[str, JSONObject]] = {
    "Error": {
        **_object(
            {
                "error": {"type": "string", "enum": ERROR_CODES},
                "detail": {"type": "string"},
                "field": {"type": "string", "description": "the field that is wrong (422 only)"},
            },
            required=["error", "detail"],
        ),
        "if": {"properties": {"error": {"const": "invalid"}}},
        "then": {"required": ["field"]},
    },
    "AssignedRole": _object(
        {"name": {"type": "string"}, "assigned_by": {"type": "string"}, "assigned_at": _TIME}
    ),
    "User": _object(
        {
            "name": _NAME,
            "kind": {"type": "string", "enum": ["service", "admin"]},
            "href": {"type": "string"},
            "description": _nullable({"type": "string"}),
            "roles": {"type": "array", "items": _ref("AssignedRole")},
            "allowed_origins": _strings(),
            "disabled": {"type": "boolean"},
            "rate_limit": _nullable(_ref("RateLimit")),
            "created_at": _TIME,
            "created_by": {"type": "string"},
        }
    ),
    "RateLimit": _RATE_LIMIT,
    "Token": _object(_TOKEN_FIELDS),
    "IssuedToken": _object(
        {**_TOKEN_FIELDS, "token": {"type": "string", "pattern": "^gw_", "description": "shown this once"}}
    ),
    "ApiKey": _object(_KEY_FIELDS),
    "IssuedKey": _object(
        {**_KEY_FIELDS, "secret": {"type": "string", "pattern": "^gwk_", "description": "shown this once"}}
    ),
    "AuditEvent": _object(
        {
            "id": {"type": "integer"},
            "at": _TIME,
            "actor": {"type": "string"},
            "action": {"type": "string", "enum": ACTIONS},
            "target": {"type": "string"},
            "detail": {"type": "object"},
        }
    ),
    "Role": _object(
        {
            "name": {"type": "string"},
            "description": _nullable({"type": "string"}),
            "permissions": _strings(),
            "includes": _strings(),
        }
    ),
    "RouteCors": _object(
        {
            "origins": _object({"store": {"type": "boolean"}, "extra": _strings()}),
            "allow_headers": _strings(),
            "expose_headers": _strings(),
            "max_age": {"type": "integer"},
        }
    ),
    "Route": _object(
        {
            "name": {"type": "string"},
            "prefix": {"type": "string"},
            "upstream": {"type": "string"},
            "timeout": {"type": "number"},
            "strip_prefix": {"type": "boolean"},
            "preserve_host": {"type": "boolean"},
            "cors": _nullable(_ref("RouteCors")),
        }
    ),
}
SCHEMAS["Trace"] = {
    "type": "object",
    "required": ["request", "steps", "decision"],
    "properties": {
        "request": {"type": "object"},
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["step", "result", "detail"],
                "properties": {
                    "step": {
                        "enum": ["method", "route", "path", "rule", "credential", "permission", "origin"]
                    },
                    "result": {"enum": ["ok", "refused", "skipped", "not_reached"]},
                    "detail": {"type": "string"},
                },
            },
        },
        "decision": _object(
            {
                "allowed": {"type": "boolean"},
                "status": _nullable({"type": "integer"}),
                "error": _nullable({"type": "string"}),
                "detail": _nullable({"type": "string"}),
                "upstream": _nullable({"type": "string"}),
                "identity_headers": _nullable(
                    {"type": "object", "additionalProperties": _nullable({"type": "string"})}
                ),
            }
        ),
    },
}
for _item in ("User", "Token", "ApiKey", "AuditEvent", "Role", "Route"):
    SCHEMAS[_item + "List"] = _object(
        {
            "items": {"type": "array", "items": _ref(_item), "maxItems": MAX_PAGE},
            "next": _nullable({"type": "string", "maxLength": MAX_CURSOR}),
        },
        ["items", "next"],
    )


def _bodies(role: JSONObject) -> dict[str, JSONObject]:
    """Request bodies; `role` is the schema of one role name (the roles policies/ defines now)."""
    roles: JSONObject = {"type": "array", "items": role, "maxItems": MAX_LIST}
    return {
        "NewUser": _object(
            {
                "name": _NAME,
                "description": _nullable(_TEXT),
                "roles": _nullable({**roles}),
                "allowed_origins": _nullable({**_strings(maxLength=MAX_ORIGIN), "maxItems": MAX_LIST}),
                "rate_limit": _RATE_LIMIT_INPUT,
            },
            required=["name"],
        ),
        "UserChange": _object(
            {
                "description": _nullable(_TEXT),
                "roles": {**roles, "description": "replaces the whole set"},
                "allowed_origins": {**_strings(maxLength=MAX_ORIGIN), "maxItems": MAX_LIST},
                "disabled": {"type": "boolean"},
                "rate_limit": _RATE_LIMIT_INPUT,
            },
            required=[],
        ),
        "ExplainRequest": _object(
            {
                "method": {"type": "string", "maxLength": 32, "description": "an HTTP method, e.g. GET"},
                "url": {
                    "type": "string",
                    "maxLength": 8192,
                    "description": "a path such as /orders/1?x=1, or an http(s):// URL",
                },
                "user": _nullable({**_NAME, "description": "decide as this user (its roles, no token)"}),
                "token": _nullable(
                    {"type": "string", "maxLength": 4096, "description": "decide for this bearer token"}
                ),
                "origin": _nullable({"type": "string", "maxLength": 2048, "description": "Origin header"}),
            },
            required=["method", "url"],
        ),
        "NewToken": _object(
            {
                "name": _NAME,
                "description": _nullable(_TEXT),
                "expires_at": _nullable({"type": "string", "description": "ISO 8601 date or date-time"}),
                "roles": _nullable(
                    {
                        **roles,
                        "description": "null: the token follows the user's roles; else roles the user holds "
                        "or reaches through includes (422 names a role that is not defined in policies/ "
                        "or not held by the user); it carries this list intersected with what the "
                        "user holds or reaches at each request",
                    }
                ),
            },
            required=["name"],
        ),
        "NewKey": _object(
            {
                "description": _nullable(_TEXT),
                "expires_at": _nullable({"type": "string", "description": "ISO 8601 date or date-time"}),
                "roles": _nullable(
                    {**roles, "description": "null: the key's tokens carry the user's roles; else this list"}
                ),
            },
            required=[],
        ),
    }


_REQUEST_ID: Final[JSONObject] = {"X-Request-Id": {"schema": {"type": "string"}}}


def _json(schema: JSONObject, description: str) -> JSONObject:
    return {
        "description": description,
        "headers": _REQUEST_ID,
        "content": {"application/json": {"schema": schema}},
    }


def _error(description: str, *, authenticate: bool = False) -> JSONObject:
    answer = _json(_ref("Error"), description)
    if authenticate:
        answer["headers"] = {**_REQUEST_ID, "WWW-Authenticate": {"schema": {"type": "string"}}}
    return answer


_ERRORS: Final[dict[str, JSONObject]] = {
    "400": _error("bad_request: malformed JSON, wrong content type, two Authorization headers"),
    "401": _error("missing_token, invalid_token, token_expired or user_disabled", authenticate=True),
    "403": _error("forbidden: the token is not an admin identity's"),
    "404": _error("not_found: no such user or token"),
    "409": _error("conflict: the name is taken"),
    "413": _error(f"body_too_large: more than {MAX_BODY_BYTES} bytes"),
    "422": _error("invalid: `field` names the field that is wrong"),
    "503": _error("store_unavailable: the store cannot be reached"),
}


def _operation(
    operation_id: str,
    summary: str,
    ok: tuple[str, JSONObject],
    errors: str,
    *,
    parameters: list[JSONObject] | None = None,
    body: str | None = None,
) -> JSONObject:
    responses: dict[str, JSONObject] = {ok[0]: ok[1]}
    # 422 everywhere: an unknown query parameter is refused on every endpoint.
    for status in ["400", "401", "403", *errors.split(), "422", "503"]:
        responses[status] = _ERRORS[status]
    if body is not None:
        for status in ("413", "422"):
            responses[status] = _ERRORS[status]
    operation: JSONObject = {
        "operationId": operation_id,
        "summary": summary,
        "responses": dict(sorted(responses.items())),
    }
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def _parameter(name: str, where: str, schema: JSONObject, description: str) -> JSONObject:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }


def _links(parameters: dict[str, str], *operation_ids: str) -> dict[str, JSONObject]:
    """OpenAPI links: where the fields of an answer can be used next (for clients and test tools)."""
    return {
        operation_id[0].upper() + operation_id[1:]: {"operationId": operation_id, "parameters": parameters}
        for operation_id in operation_ids
    }


_USER: Final = _parameter("name", "path", _NAME, "the service user's name")
_TOKEN: Final = _parameter("token", "path", _NAME, "the token's name")
_NO_CONTENT: Final[JSONObject] = {"description": "done", "headers": _REQUEST_ID}
_TEXT_QUERY: Final[JSONObject] = {"type": "string"}
# Every list pages: `next` of one answer is `after` of the next request, null on the last page.
_PAGE: Final[list[JSONObject]] = [
    _parameter(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
        "items per page",
    ),
    _parameter(
        "after",
        "query",
        {"type": "string", "maxLength": MAX_CURSOR},
        "the `next` value of the page before (a cursor on the sort key, not an offset)",
    ),
]


def _user_paths() -> dict[str, JSONObject]:
    user = "/v1/service-users/{name}"
    created = _json(_ref("User"), "the new user")
    created["links"] = _links(
        {"name": "$response.body#/name"}, "getUser", "updateUser", "listTokens", "createToken", "deleteUser"
    )
    return {
        "/v1/service-users": {
            "get": _operation(
                "listUsers",
                "List service users (sorted by name)",
                ("200", _json(_ref("UserList"), "the users")),
                "422",
                parameters=[
                    _parameter("prefix", "query", _TEXT_QUERY, "only names starting with this"),
                    _parameter("role", "query", _TEXT_QUERY, "only users holding this role"),
                    *_PAGE,
                ],
            ),
            "post": _operation(
                "createUser",
                "Create a service user (default role service-user-project-admin)",
                ("201", created),
                "409",
                body="NewUser",
            ),
        },
        user: {
            "get": _operation(
                "getUser",
                "Get a service user",
                ("200", _json(_ref("User"), "the user")),
                "404",
                parameters=[_USER],
            ),
            "patch": _operation(
                "updateUser",
                "Change a service user; roles and allowed_origins replace the whole set",
                ("200", _json(_ref("User"), "the user as changed")),
                "404",
                parameters=[_USER],
                body="UserChange",
            ),
            "delete": _operation(
                "deleteUser", "Delete a user and its tokens", ("204", _NO_CONTENT), "404", parameters=[_USER]
            ),
        },
    }


def _token_paths() -> dict[str, JSONObject]:
    tokens, token = "/v1/service-users/{name}/tokens", "/v1/service-users/{name}/tokens/{token}"
    issued = _json(_ref("IssuedToken"), "the token and its secret (shown this once)")
    issued["links"] = _links(
        {"name": "$response.body#/user", "token": "$response.body#/name"},
        "resetToken",
        "expireToken",
        "deleteToken",
    )
    both = [_USER, _TOKEN]
    return {
        tokens: {
            "get": _operation(
                "listTokens",
                "List a user's tokens (sorted by name; never a secret)",
                ("200", _json(_ref("TokenList"), "the tokens")),
                "404",
                parameters=[_USER, *_PAGE],
            ),
            "post": _operation(
                "createToken",
                "Issue a token; the answer holds its secret, shown this once",
                ("201", issued),
                "404 409",
                parameters=[_USER],
                body="NewToken",
            ),
        },
        token + "/reset": {
            "post": _operation(
                "resetToken",
                "New secret for the same token id (the old one stops working at once)",
                ("200", _json(_ref("IssuedToken"), "the token and its new secret (shown this once)")),
                "404",
                parameters=both,
            )
        },
        token + "/expire": {
            "post": _operation(
                "expireToken",
                "Expire the token now (it stays listed, as expired)",
                ("200", _json(_ref("Token"), "the token")),
                "404",
                parameters=both,
            )
        },
        token: {
            "delete": _operation(
                "deleteToken", "Delete a token", ("204", _NO_CONTENT), "404", parameters=both
            ),
        },
    }


_KEY: Final = _parameter("key", "path", {"type": "string", "pattern": _KEY_ID}, "the API key's id")


def _key_paths() -> dict[str, JSONObject]:
    keys, key = "/v1/service-users/{name}/keys", "/v1/service-users/{name}/keys/{key}"
    issued = _json(_ref("IssuedKey"), "the key and its secret (shown this once)")
    issued["links"] = _links(
        {"name": "$response.body#/user", "key": "$response.body#/id"}, "expireKey", "deleteKey"
    )
    both = [_USER, _KEY]
    return {
        keys: {
            "get": _operation(
                "listKeys",
                "List a user's API keys (oldest first; never a secret)",
                ("200", _json(_ref("ApiKeyList"), "the keys")),
                "404",
                parameters=[_USER, *_PAGE],
            ),
            "post": _operation(
                "createKey",
                "Create an API key (exchanged at POST /.gateway/token); the answer holds its secret once",
                ("201", issued),
                "404",
                parameters=[_USER],
                body="NewKey",
            ),
        },
        key + "/expire": {
            "post": _operation(
                "expireKey",
                "Expire the key now: tokens minted from it stop working at once",
                ("200", _json(_ref("ApiKey"), "the key")),
                "404",
                parameters=both,
            )
        },
        key: {
            "delete": _operation(
                "deleteKey", "Delete an API key", ("204", _NO_CONTENT), "404", parameters=both
            ),
        },
        "/v1/api-keys/{key}": {
            "get": _operation(
                "getKey",
                "One API key by its id, whoever holds it (never its secret)",
                ("200", _json(_ref("ApiKey"), "the key")),
                "404",
                parameters=[both[1]],
            ),
        },
    }


def _other_paths() -> dict[str, JSONObject]:
    text = _TEXT_QUERY
    return {
        "/v1/roles": {
            "get": _operation(
                "listRoles",
                "Roles defined in policies/ (by name)",
                ("200", _json(_ref("RoleList"), "the roles")),
                "",
                parameters=_PAGE,
            ),
        },
        "/v1/routes": {
            "get": _operation(
                "listRoutes",
                "Routes of the live configuration",
                ("200", _json(_ref("RouteList"), "routes")),
                "",
                parameters=_PAGE,
            ),
        },
        "/v1/audit-events": {
            "get": _operation(
                "listAuditEvents",
                "Audit events, newest first",
                ("200", _json(_ref("AuditEventList"), "the events")),
                "422",
                parameters=[
                    _parameter("actor", "query", text, "only changes by this actor"),
                    _parameter("since", "query", text, "ISO 8601 date or date-time; events at or after it"),
                    _parameter("user", "query", text, "only events about this user, its tokens and keys"),
                    *_PAGE,
                ],
            ),
        },
        "/v1/authz/explain": {
            "post": _operation(
                "explainDecision",
                "Why a request would be allowed or refused (exactly one of user and token; nothing is "
                "forwarded, last_used_at is not updated)",
                ("200", _json(_ref("Trace"), "the trace: request, steps, decision")),
                "404 422",
                body="ExplainRequest",
            ),
        },
        "/healthz": {"get": _open("Liveness", _json(_object({"status": text}), "alive"))},
        "/readyz": {
            "get": _open(
                "Readiness: the store answers and the process is not draining",
                _json(_object({"status": text}), "ready"),
                {"503": _json(_object({"status": text, "detail": text}), "store unreachable, or draining")},
            )
        },
        "/metrics": {
            "get": _open(
                "Prometheus metrics",
                {"description": "text exposition", "content": {"text/plain": {"schema": text}}},
            )
        },
        "/jwks.json": {
            "get": _open(
                "The public keys that verify the gateway's JWTs (access tokens, assertions)",
                _json(
                    _object({"keys": {"type": "array", "items": {"type": "object"}}}),
                    "a JWK Set: kid, kty, crv, x, [y], alg, use per key",
                ),
            )
        },
        "/openapi.json": {"get": _open("This document", _json({"type": "object"}, "OpenAPI 3.1"))},
    }


def _open(summary: str, ok: JSONObject, more: dict[str, JSONObject] | None = None) -> JSONObject:
    return {"summary": summary, "security": [], "responses": {"200": ok, **(more or {})}}


def openapi_document(role_names: Iterable[str] = ()) -> JSONObject:
    """The OpenAPI 3.1 document of the admin listener; `role_names` (if any) become the roles' enum."""
    defined = sorted(role_names)
    role: JSONObject = {"type": "string", "enum": defined} if defined else {"type": "string"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "service-user gateway admin API",
            "version": "1",
            "description": "Service users, tokens, roles, routes and the audit trail. "
            "Every /v1 call needs `Authorization: Bearer <admin token>`.",
        },
        "security": [{"bearerAuth": []}],
        "paths": {**_user_paths(), **_token_paths(), **_key_paths(), **_other_paths()},
        "components": {
            "schemas": {**SCHEMAS, **_bodies(role)},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
