"""A service user's `rate_limit` through the admin API: set on create, PATCH, reset with null, and 422s."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin.conftest import Admin, assert_error, issue

USERS = "/v1/service-users"
LIMIT = {"rate": 100, "per": "1s", "burst": 200}

# Each bad value, and the field the 422 names.
BAD: list[tuple[Any, str, str]] = [
    ("100/1s:200", "rate_limit", "must be an object"),
    ([100, "1s"], "rate_limit", "must be an object"),
    ({"per": "1s"}, "rate_limit.rate", "rate: is required"),
    ({"rate": 10}, "rate_limit.per", "per: is required"),
    ({"rate": 0, "per": "1s"}, "rate_limit.rate", "rate: must be an integer from 1 to 1000000000"),
    ({"rate": 1.5, "per": "1s"}, "rate_limit.rate", "rate: must be an integer"),
    ({"rate": "10", "per": "1s"}, "rate_limit.rate", "rate: must be an integer"),
    ({"rate": True, "per": "1s"}, "rate_limit.rate", "rate: must be an integer"),
    ({"rate": None, "per": "1s"}, "rate_limit.rate", "rate: must be an integer"),
    ({"rate": 1_000_000_001, "per": "1s"}, "rate_limit.rate", "rate: must be an integer"),
    ({"rate": 10, "per": "1d"}, "rate_limit.per", "per: '1d' is not a period"),
    ({"rate": 10, "per": "0s"}, "rate_limit.per", "longer than zero"),
    ({"rate": 10, "per": "25h"}, "rate_limit.per", "longer than a day"),
    ({"rate": 10, "per": 1}, "rate_limit.per", "per: must be a period"),
    ({"rate": 10, "per": " 1s"}, "rate_limit.per", "spaces"),
    ({"rate": 10, "per": "1.000000000001s"}, "rate_limit.per", "too many decimals"),
    ({"rate": 10, "per": "1s", "burst": 0}, "rate_limit.burst", "burst: must be an integer from 1"),
    ({"rate": 10, "per": "1s", "burst": "20"}, "rate_limit.burst", "burst: must be an integer"),
    ({"rate": 10, "per": "1s", "window": 5}, "rate_limit.window", "unknown field 'window'"),
]


async def test_create_with_a_limit_and_without(admin: Admin) -> None:
    created = await admin.call("POST", USERS, json={"name": "svc", "roles": ["reader"], "rate_limit": LIMIT})
    assert created.status == 201, created.text
    assert created.body["rate_limit"] == LIMIT
    assert (await admin.call("GET", f"{USERS}/svc")).body["rate_limit"] == LIMIT
    short = await admin.call("POST", USERS, json={"name": "short", "rate_limit": {"rate": 5, "per": "60s"}})
    assert short.status == 201 and short.body["rate_limit"] == {"rate": 5, "per": "1m", "burst": 5}
    explicit = await admin.call("POST", USERS, json={"name": "nulls", "rate_limit": None})
    assert explicit.status == 201 and explicit.body["rate_limit"] is None
    plain = await admin.call("POST", USERS, json={"name": "plain"})
    assert plain.status == 201 and plain.body["rate_limit"] is None
    listed = (await admin.call("GET", USERS)).body["items"]
    assert {u["name"]: u["rate_limit"] for u in listed} == {
        "nulls": None,
        "plain": None,
        "root": None,
        "short": {"rate": 5, "per": "1m", "burst": 5},
        "svc": LIMIT,
    }
    events = (await admin.call("GET", "/v1/audit-events?actor=root")).body["items"]
    created_details = {
        e["target"]: e["detail"]["rate_limit"] for e in events if e["action"] == "user.created"
    }
    assert created_details["user/svc"] == "100/1s:200" and created_details["user/plain"] is None


async def test_patch_sets_keeps_and_resets(admin: Admin) -> None:
    await issue(admin)  # svc, role writer, and a token
    path = f"{USERS}/svc"
    changed = await admin.call("PATCH", path, json={"rate_limit": {"rate": 10, "per": "1m", "burst": 20}})
    assert changed.status == 200, changed.text
    assert changed.body["rate_limit"] == {"rate": 10, "per": "1m", "burst": 20}
    kept = await admin.call("PATCH", path, json={"description": "no limit field: unchanged"})
    assert kept.status == 200 and kept.body["rate_limit"] == {"rate": 10, "per": "1m", "burst": 20}
    reset = await admin.call("PATCH", path, json={"rate_limit": None})
    assert reset.status == 200 and reset.body["rate_limit"] is None
    assert (await admin.call("GET", path)).body["rate_limit"] is None
    events = (await admin.call("GET", "/v1/audit-events?actor=root")).body["items"]
    updates = [e["detail"] for e in events if e["action"] == "user.updated" and e["target"] == "user/svc"]
    assert updates == [
        {"rate_limit": None},
        {"description": "no limit field: unchanged"},
        {"rate_limit": "10/1m:20"},
    ]


async def test_patch_reaches_the_running_gateways_cached_identity(admin: Admin) -> None:
    """The token's identity is cached by its first use; the PATCH evicts it (README "Freshness")."""
    secret = (await issue(admin))["token"]
    authenticator = admin.gateway.authenticator
    assert (await authenticator.authenticate_token(secret)).rate_limit is None  # now cached
    assert (await admin.call("PATCH", f"{USERS}/svc", json={"rate_limit": LIMIT})).status == 200
    principal = await authenticator.authenticate_token(secret)
    assert principal.rate_limit is not None
    assert (principal.rate_limit.rate, principal.rate_limit.per, principal.rate_limit.burst) == (100, 1, 200)
    assert (await admin.call("PATCH", f"{USERS}/svc", json={"rate_limit": None})).status == 200
    assert (await authenticator.authenticate_token(secret)).rate_limit is None


@pytest.mark.parametrize(("value", "field", "message"), BAD)
async def test_bad_values_are_422_naming_the_field(
    admin: Admin, value: Any, field: str, message: str
) -> None:
    await admin.call("POST", USERS, json={"name": "svc", "rate_limit": LIMIT})
    before = (await admin.call("GET", "/v1/audit-events")).body["items"]
    patched = await admin.call("PATCH", f"{USERS}/svc", json={"rate_limit": value})
    assert_error(patched, 422, "invalid", field)
    assert message in patched.body["detail"], patched.body
    created = await admin.call("POST", USERS, json={"name": "other", "rate_limit": value})
    assert_error(created, 422, "invalid", field)
    assert message in created.body["detail"], created.body
    assert (await admin.call("GET", f"{USERS}/svc")).body["rate_limit"] == LIMIT
    assert (await admin.call("GET", f"{USERS}/other")).status == 404
    assert (await admin.call("GET", "/v1/audit-events")).body["items"] == before


async def test_the_openapi_document_describes_the_field(admin: Admin) -> None:
    document = (await admin.call("GET", "/openapi.json", token=None)).body
    schemas = document["components"]["schemas"]
    assert "rate_limit" in schemas["User"]["required"]
    assert schemas["RateLimit"]["required"] == ["rate", "per", "burst"]
    for body in ("NewUser", "UserChange"):
        [limit, null] = schemas[body]["properties"]["rate_limit"]["anyOf"]
        assert null == {"type": "null"} and limit["required"] == ["rate", "per"]
        assert set(limit["properties"]) == {"rate", "per", "burst"} and limit["additionalProperties"] is False
