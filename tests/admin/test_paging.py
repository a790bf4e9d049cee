"""Lists page (CONTRACT "Command line, second wave"): `limit` + `after` answer `{"items", "next"}`,
with the cursor on the sort key, stable while rows come and go; unknown query parameters are 422.
Real gateway, real SQLite file and PostgreSQL database."""

from __future__ import annotations

import asyncio
import base64
import random
from typing import Any

from sqlalchemy import insert

from gateway.models import ServiceUser
from gateway.timeparse import utcnow
from tests.admin.conftest import Admin, assert_error, issue

USERS = 1050


async def _bulk_users(admin: Admin, names: list[str]) -> None:
    """Insert users straight into the store (1,050 API calls would only slow the test down)."""
    now = utcnow()
    rows = [
        {"name": name, "kind": "service", "disabled": False, "created_at": now, "created_by": "test"}
        for name in names
    ]
    async with admin.gateway.store.write_sessions() as session, session.begin():
        await session.execute(insert(ServiceUser), rows)


async def _walk(admin: Admin, path: str, limit: int, between: Any = None) -> tuple[list[Any], int]:
    """Every item of a list, page by page; `between()` runs after each page. Items and pages."""
    found: list[Any] = []
    after: str | None = None
    pages = 0
    while True:
        query = f"limit={limit}" + (f"&after={after}" if after is not None else "")
        answer = await admin.call("GET", f"{path}{'&' if '?' in path else '?'}{query}")
        assert answer.status == 200, answer.text
        assert set(answer.body) == {"items", "next"}
        assert len(answer.body["items"]) <= limit
        found.extend(answer.body["items"])
        pages += 1
        after = answer.body["next"]
        if after is None:
            return found, pages
        assert answer.body["items"], "a page with a next cursor holds items"
        if between is not None:
            await between()


async def test_1050_users_each_come_exactly_once_while_others_are_created_and_deleted(admin: Admin) -> None:
    names = [f"u{index:04d}" for index in range(USERS)]
    await _bulk_users(admin, names)
    churn = random.Random(7)
    created: list[str] = []

    async def meanwhile() -> None:
        # Rows appear before and after the cursor, and vanish too: an offset would skip or repeat.
        for _ in range(3):
            name = f"u{churn.randrange(USERS):04d}-x{len(created)}"
            answer = await admin.call("POST", "/v1/service-users", json={"name": name, "roles": ["reader"]})
            assert answer.status == 201, answer.text
            created.append(name)
        if len(created) > 3:
            gone = created.pop(churn.randrange(len(created) - 3))
            assert (await admin.call("DELETE", f"/v1/service-users/{gone}")).status == 204

    found, pages = await _walk(admin, "/v1/service-users", 100, meanwhile)
    seen = [item["name"] for item in found]
    assert len(seen) == len(set(seen)), "a user came twice"
    assert sorted(seen) == seen, "pages out of order"
    missing = set(names) - set(seen)
    assert not missing, (
        f"{len(missing)} users that existed the whole walk were skipped, e.g. {sorted(missing)[:3]}"
    )
    assert pages >= USERS // 100 + 1

    # Without churn, the pages add up to the whole list, and the default page is 100.
    whole = (await admin.call("GET", "/v1/service-users?limit=1000")).body
    first = (await admin.call("GET", "/v1/service-users")).body
    assert len(first["items"]) == 100 and first["next"] is not None
    walked, _ = await _walk(admin, "/v1/service-users", 1000)
    assert [item["name"] for item in walked][:1000] == [item["name"] for item in whole["items"]]


async def test_filters_and_pages_combine(admin: Admin) -> None:
    await _bulk_users(admin, [f"team-{index:02d}" for index in range(25)] + ["other"])
    found, pages = await _walk(admin, "/v1/service-users?prefix=team-", 10)
    assert [item["name"] for item in found] == [f"team-{index:02d}" for index in range(25)]
    assert pages == 3


async def test_tokens_keys_audit_roles_and_routes_page_too(admin: Admin) -> None:
    for index in range(7):
        await issue(admin, "svc", f"t{index}")
    tokens, pages = await _walk(admin, "/v1/service-users/svc/tokens", 3)
    assert [token["name"] for token in tokens] == [f"t{index}" for index in range(7)] and pages == 3

    for _ in range(5):
        answer = await admin.call("POST", "/v1/service-users/svc/keys", json={})
        assert answer.status == 201, answer.text
    keys, pages = await _walk(admin, "/v1/service-users/svc/keys", 2)
    whole = (await admin.call("GET", "/v1/service-users/svc/keys")).body["items"]
    assert [key["id"] for key in keys] == [key["id"] for key in whole] and len(keys) == 5 and pages == 3

    events, _ = await _walk(admin, "/v1/audit-events", 4)
    ids = [event["id"] for event in events]
    assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids)) >= 13
    by_actor, _ = await _walk(admin, "/v1/audit-events?actor=root", 2)
    assert {event["actor"] for event in by_actor} == {"root"} and len(by_actor) == 13

    roles, _ = await _walk(admin, "/v1/roles", 1)
    assert [role["name"] for role in roles] == sorted(role["name"] for role in roles) and len(roles) >= 4
    routes, _ = await _walk(admin, "/v1/routes", 2)
    assert [route["name"] for route in routes] == ["echo", "deep", "strip", "browser"]


async def test_bad_limits_and_cursors_are_422_naming_the_field(admin: Admin) -> None:
    await _bulk_users(admin, ["a", "b", "c"])
    cursor = (await admin.call("GET", "/v1/service-users?limit=1")).body["next"]
    tampered = base64.urlsafe_b64encode(b"[1]").decode().rstrip("=")  # an int where a name goes
    for path, field in (
        ("/v1/service-users?limit=0", "limit"),
        ("/v1/service-users?limit=1001", "limit"),
        ("/v1/service-users?limit=", "limit"),
        ("/v1/service-users?limit=1&limit=2", "limit"),
        ("/v1/service-users?after=%%%", "after"),
        ("/v1/service-users?after=bm90IGpzb24", "after"),  # "not json"
        (f"/v1/service-users?after={tampered}", "after"),
        (f"/v1/service-users?after={cursor}&after={cursor}", "after"),
        (f"/v1/service-users/a/keys?after={cursor}", "after"),  # a users cursor is no keys cursor
        (f"/v1/audit-events?after={cursor}", "after"),
        ("/v1/service-users?after=" + "A" * 2000, "after"),
    ):
        assert_error(await admin.call("GET", path), 422, "invalid", field)
    # A cursor is a position, not a row: it still works after its row is deleted.
    assert (await admin.call("DELETE", "/v1/service-users/a")).status == 204
    rest = await admin.call("GET", f"/v1/service-users?after={cursor}")
    assert [item["name"] for item in rest.body["items"]] == ["b", "c", "root"]


async def test_unknown_query_parameters_are_refused_on_every_endpoint(admin: Admin) -> None:
    await issue(admin, "svc", "t1")
    for method, path, body in (
        ("GET", "/v1/service-users?prefx=a", None),  # the typo that would otherwise list everyone
        ("GET", "/v1/service-users?page=2", None),
        ("GET", "/v1/service-users/svc?x=1", None),
        ("GET", "/v1/service-users/svc/tokens?offset=5", None),
        ("GET", "/v1/audit-events?target=svc", None),
        ("GET", "/v1/roles?name=reader", None),
        ("POST", "/v1/service-users?dry_run=true", {"name": "new", "roles": ["reader"]}),
        ("DELETE", "/v1/service-users/svc?force=1", None),
        ("POST", "/v1/service-users/svc/tokens/t1/expire?now=1", None),
    ):
        answer = await admin.call(method, path, json=body)
        assert_error(answer, 422, "invalid")
        assert "unknown query parameter" in answer.body["detail"], answer.text
    # Nothing happened on the refused writes.
    assert (await admin.call("GET", "/v1/service-users/new")).status == 404
    assert (await admin.call("GET", "/v1/service-users/svc")).status == 200
    token = (await admin.call("GET", "/v1/service-users/svc/tokens")).body["items"][0]
    assert token["expires_at"] is None


async def test_concurrent_walks_agree(admin: Admin) -> None:
    await _bulk_users(admin, [f"p{index:03d}" for index in range(300)])
    walks = await asyncio.gather(*(_walk(admin, "/v1/service-users", size) for size in (7, 50, 300)))
    names = [[item["name"] for item in found] for found, _ in walks]
    assert names[0] == names[1] == names[2] and len(names[0]) == 301
