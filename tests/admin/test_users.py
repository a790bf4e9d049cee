"""Service users through the admin API: create, list with filters, get, PATCH, delete, and their errors."""

from __future__ import annotations

from typing import Any

from tests.admin.conftest import Admin, assert_error, issue

USER_KEYS = {
    "name",
    "kind",
    "href",
    "description",
    "roles",
    "allowed_origins",
    "disabled",
    "rate_limit",
    "created_at",
    "created_by",
}


def names(answer: Any) -> list[str]:
    return [item["name"] for item in answer.body["items"]]


async def test_create_get_list_and_filter(admin: Admin) -> None:
    created = await admin.call(
        "POST",
        "/v1/service-users",
        json={
            "name": "billing",
            "description": "Billing backend",
            "roles": ["writer", "reader"],
            "allowed_origins": ["https://App.example.com:443"],
        },
    )
    assert created.status == 201, created.text
    user = created.body
    assert set(user) == USER_KEYS
    assert created.headers["Location"] == "/v1/service-users/billing" == user["href"]
    assert user["kind"] == "service" and user["disabled"] is False
    assert user["created_by"] == "root"  # the actor is the admin's name
    assert [r["name"] for r in user["roles"]] == ["reader", "writer"]
    assert all(r["assigned_by"] == "root" and r["assigned_at"].endswith("Z") for r in user["roles"])
    assert user["allowed_origins"] == ["https://app.example.com"]
    assert user["created_at"].endswith("Z")

    default = await admin.call("POST", "/v1/service-users", json={"name": "ci-job"})
    assert default.status == 201
    assert default.body["description"] is None  # absent values are null, never missing keys
    assert [r["name"] for r in default.body["roles"]] == ["service-user-project-admin"]
    assert default.body["allowed_origins"] == []
    bare = await admin.call("POST", "/v1/service-users", json={"name": "bare", "roles": []})
    assert bare.status == 201 and bare.body["roles"] == []

    got = await admin.call("GET", "/v1/service-users/billing")
    assert got.status == 200 and got.body == user
    everyone = await admin.call("GET", "/v1/service-users")
    assert names(everyone) == ["bare", "billing", "ci-job", "root"]
    root = everyone.body["items"][-1]
    assert root["kind"] == "admin" and root["roles"] == []
    assert names(await admin.call("GET", "/v1/service-users?prefix=b")) == ["bare", "billing"]
    assert names(await admin.call("GET", "/v1/service-users?role=reader")) == ["billing"]
    assert names(await admin.call("GET", "/v1/service-users?prefix=c&role=reader")) == []
    assert names(await admin.call("GET", "/v1/service-users?prefix=&role=")) == names(everyone)
    assert names(await admin.call("GET", "/v1/service-users?prefix=%25")) == []  # LIKE wildcards are literal


async def test_create_errors(admin: Admin) -> None:
    post = "/v1/service-users"
    assert (await admin.call("POST", post, json={"name": "dup"})).status == 201
    conflict = await admin.call("POST", post, json={"name": "dup"})
    assert_error(conflict, 409, "conflict")
    assert conflict.body["detail"] == "user 'dup' already exists"
    for body, field in (
        ({"name": "Bad Name"}, "name"),
        ({"name": "trailing\n"}, "name"),
        ({"name": ""}, "name"),
        ({}, "name"),
        ({"name": None}, "name"),
        ({"name": 7}, "name"),
        ({"name": "ok", "roles": ["z"]}, "roles"),
        ({"name": "ok", "roles": "writer"}, "roles"),
        ({"name": "ok", "roles": [1]}, "roles"),
        ({"name": "ok", "allowed_origins": ["not an origin"]}, "allowed_origins"),
        ({"name": "ok", "allowed_origins": ["https://a.example/path"]}, "allowed_origins"),
        ({"name": "ok", "allowed_origins": "https://a.example"}, "allowed_origins"),
        ({"name": "ok", "description": 5}, "description"),
        ({"name": "ok", "description": "x" * 1025}, "description"),
        ({"name": "ok", "description": "nul\x00"}, "description"),
        ({"name": "ok", "kind": "admin"}, "kind"),
        ({"name": "ok", "disabled": True}, "disabled"),
    ):
        answer = await admin.call("POST", post, json=body)
        assert_error(answer, 422, "invalid", field)
    undefined = await admin.call("POST", post, json={"name": "ok", "roles": ["z"]})
    assert undefined.body["detail"] == "role 'z' is not defined in policies/"
    assert (await admin.call("GET", "/v1/service-users/ok")).status == 404  # nothing was created


async def test_not_found_messages(admin: Admin) -> None:
    # Bodies are checked first (422), so each call sends a valid one.
    for method, path in (
        ("GET", "/v1/service-users/ghost"),
        ("PATCH", "/v1/service-users/ghost"),
        ("DELETE", "/v1/service-users/ghost"),
        ("GET", "/v1/service-users/ghost/tokens"),
        ("POST", "/v1/service-users/ghost/tokens"),
        ("POST", "/v1/service-users/ghost/tokens/t/reset"),
        ("POST", "/v1/service-users/ghost/tokens/t/expire"),
        ("DELETE", "/v1/service-users/ghost/tokens/t"),
    ):
        answer = await admin.call(method, path, json={} if method == "PATCH" else {"name": "t"})
        assert_error(answer, 404, "not_found")
        assert answer.body["detail"] == "user 'ghost' not found", (method, path)
    odd = await admin.call("GET", "/v1/service-users/NOT%20A%20NAME")
    assert_error(odd, 404, "not_found")


async def test_patch_replaces_whole_sets(admin: Admin) -> None:
    await admin.call(
        "POST",
        "/v1/service-users",
        json={"name": "web", "roles": ["writer", "other"], "allowed_origins": ["https://a.example"]},
    )
    fixed = await issue(admin, "web", "fixed", roles=["writer", "other"])
    follows = await issue(admin, "web", "follows")
    assert fixed["roles"] == ["other", "writer"] and follows["roles"] is None

    patched = await admin.call(
        "PATCH",
        "/v1/service-users/web",
        json={"roles": ["reader", "writer"], "allowed_origins": ["https://b.example"], "description": "Web"},
    )
    assert patched.status == 200, patched.text
    assert [r["name"] for r in patched.body["roles"]] == ["reader", "writer"]
    assert patched.body["allowed_origins"] == ["https://b.example"]
    assert patched.body["description"] == "Web"
    tokens = {t["name"]: t for t in (await admin.call("GET", "/v1/service-users/web/tokens")).body["items"]}
    assert tokens["fixed"]["roles"] == ["writer"]  # the removed role left the token's fixed list
    assert tokens["follows"]["roles"] is None
    # Adding the role back to the user does not restore it on the token.
    await admin.call("PATCH", "/v1/service-users/web", json={"roles": ["reader", "writer", "other"]})
    tokens = {t["name"]: t for t in (await admin.call("GET", "/v1/service-users/web/tokens")).body["items"]}
    assert tokens["fixed"]["roles"] == ["writer"]

    cleared = await admin.call("PATCH", "/v1/service-users/web", json={"description": None, "disabled": True})
    assert cleared.body["description"] is None and cleared.body["disabled"] is True
    assert [r["name"] for r in cleared.body["roles"]] == ["other", "reader", "writer"]  # untouched
    unchanged = await admin.call("PATCH", "/v1/service-users/web", json={})
    assert unchanged.status == 200 and unchanged.body == cleared.body

    events = (await admin.call("GET", "/v1/audit-events?actor=root")).body["items"]
    updates = [e for e in events if e["action"] == "user.updated"]
    first = updates[-1]["detail"]
    assert first["roles_added"] == ["reader"] and first["roles_removed"] == ["other"]
    assert first["origins_added"] == ["https://b.example"] and first["origins_removed"] == [
        "https://a.example"
    ]
    assert first["token_roles_removed"] == {"fixed": ["other"]}
    assert len(updates) == 3  # the empty PATCH changed nothing and wrote nothing


async def test_patch_errors(admin: Admin) -> None:
    await admin.call("POST", "/v1/service-users", json={"name": "web"})
    path = "/v1/service-users/web"
    for body, field in (
        ({"roles": ["z"]}, "roles"),
        ({"roles": None}, "roles"),
        ({"allowed_origins": None}, "allowed_origins"),
        ({"allowed_origins": ["ftp://a.example"]}, "allowed_origins"),
        ({"disabled": "yes"}, "disabled"),
        ({"disabled": None}, "disabled"),
        ({"disabled": 1}, "disabled"),
        ({"description": ["x"]}, "description"),
        ({"name": "other"}, "name"),
    ):
        assert_error(await admin.call("PATCH", path, json=body), 422, "invalid", field)
    admin_roles = await admin.call("PATCH", "/v1/service-users/root", json={"roles": ["reader"]})
    assert_error(admin_roles, 422, "invalid", "roles")


async def test_delete_user_writes_one_event_listing_its_tokens(admin: Admin) -> None:
    first = await issue(admin, "gone", "a")
    await issue(admin, "gone", "b")
    assert await admin.proxy_status(first["token"]) == 200
    deleted = await admin.call("DELETE", "/v1/service-users/gone")
    assert deleted.status == 204 and deleted.text == ""
    assert await admin.proxy_status(first["token"]) == 401  # at once on this instance
    assert (await admin.call("GET", "/v1/service-users/gone")).status == 404
    assert_error(await admin.call("DELETE", "/v1/service-users/gone"), 404, "not_found")
    events = (await admin.call("GET", "/v1/audit-events")).body["items"]
    deletions = [e for e in events if e["action"] == "user.deleted"]
    assert len(deletions) == 1
    assert deletions[0]["target"] == "user/gone" and deletions[0]["actor"] == "root"
    assert deletions[0]["detail"]["tokens"] == ["a", "b"]
