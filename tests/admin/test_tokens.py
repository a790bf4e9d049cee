"""Tokens through the admin API: issue, list, reset, expire, delete; secrets shown once; effect at once."""

from __future__ import annotations

import re

from tests.admin.conftest import Admin, assert_error, issue

TOKEN_KEYS = {
    "id",
    "name",
    "user",
    "description",
    "roles",
    "expires_at",
    "expired",
    "created_at",
    "created_by",
    "last_used_at",
}


async def test_token_lifecycle_and_secret_shown_once(admin: Admin) -> None:
    created = await issue(admin, "svc", "main", description="CI", expires_at="2099-01-01")
    secret = created["token"]
    assert set(created) == TOKEN_KEYS | {"token"}
    assert re.fullmatch(r"gw_[0-9A-Za-z]{40,}", secret)
    assert created["expires_at"] == "2099-01-01T00:00:00Z" and created["expired"] is False
    assert created["user"] == "svc" and created["created_by"] == "root" and created["roles"] is None
    assert created["last_used_at"] is None and created["created_at"].endswith("Z")
    assert await admin.proxy_status(secret) == 200

    listed = await admin.call("GET", "/v1/service-users/svc/tokens")
    assert listed.status == 200
    (item,) = listed.body["items"]
    assert set(item) == TOKEN_KEYS and item["id"] == created["id"]
    assert secret not in listed.text

    reset = await admin.call("POST", "/v1/service-users/svc/tokens/main/reset")
    assert reset.status == 200, reset.text
    new_secret = reset.body["token"]
    assert new_secret != secret and reset.body["id"] == created["id"]  # same token, new secret
    assert reset.body["expires_at"] == created["expires_at"]
    assert await admin.proxy_status(secret) == 401  # the old secret died at once
    assert await admin.proxy_status(new_secret) == 200

    expired = await admin.call("POST", "/v1/service-users/svc/tokens/main/expire")
    assert expired.status == 200 and set(expired.body) == TOKEN_KEYS
    assert expired.body["expired"] is True and expired.body["expires_at"].endswith("Z")
    assert await admin.proxy_status(new_secret) == 401
    again = await admin.call("POST", "/v1/service-users/svc/tokens/main/expire")
    assert again.status == 200 and again.body["expires_at"] == expired.body["expires_at"]
    (still,) = (await admin.call("GET", "/v1/service-users/svc/tokens")).body["items"]
    assert still["expired"] is True  # stays listed, as expired

    deleted = await admin.call("DELETE", "/v1/service-users/svc/tokens/main")
    assert deleted.status == 204 and deleted.text == ""
    assert (await admin.call("GET", "/v1/service-users/svc/tokens")).body["items"] == []

    audit = await admin.call("GET", "/v1/audit-events")
    actions = [
        (e["action"], e["target"]) for e in audit.body["items"] if e["target"].startswith("token/svc/")
    ]
    assert actions == [
        ("token.deleted", "token/svc/main"),
        ("token.expired", "token/svc/main"),
        ("token.reset", "token/svc/main"),
        ("token.created", "token/svc/main"),
    ]
    for text in (audit.text, (await admin.call("GET", "/v1/service-users/svc")).text):
        assert secret not in text and new_secret not in text


async def test_token_errors(admin: Admin) -> None:
    await issue(admin, "svc", "main")
    post = "/v1/service-users/svc/tokens"
    conflict = await admin.call("POST", post, json={"name": "main"})
    assert_error(conflict, 409, "conflict")
    for body, field in (
        ({"name": "BAD"}, "name"),
        ({}, "name"),
        ({"name": "x", "roles": ["other"]}, "roles"),
        ({"name": "x", "roles": "writer"}, "roles"),
        ({"name": "x", "expires_at": "2000-01-01"}, "expires_at"),
        ({"name": "x", "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "x", "expires_at": "9999-12-31T23:59:59-23:59"}, "expires_at"),
        ({"name": "x", "expires_at": 1893456000}, "expires_at"),
        ({"name": "x", "description": False}, "description"),
        ({"name": "x", "secret": "gw_mine"}, "secret"),
    ):
        assert_error(await admin.call("POST", post, json=body), 422, "invalid", field)
    not_held = await admin.call("POST", post, json={"name": "x", "roles": ["reader", "other"]})
    assert_error(not_held, 422, "invalid", "roles")
    assert not_held.body["detail"] == "role 'other' is not held by user 'svc'"
    undefined = await admin.call("POST", post, json={"name": "x", "roles": ["ghost"]})
    assert_error(undefined, 422, "invalid", "roles")
    assert undefined.body["detail"] == "role 'ghost' is not defined in policies/"
    past = await admin.call("POST", post, json={"name": "x", "expires_at": "2000-01-01"})
    assert "2000-01-01T00:00:00Z" in past.body["detail"]
    missing = await admin.call("POST", "/v1/service-users/svc/tokens/nope/reset")
    assert_error(missing, 404, "not_found")
    assert missing.body["detail"] == "token 'nope' not found for user 'svc'"
    for method, path in (
        ("POST", "/v1/service-users/svc/tokens/nope/expire"),
        ("DELETE", "/v1/service-users/svc/tokens/nope"),
    ):
        assert_error(await admin.call(method, path), 404, "not_found")
    # Fixed roles must be held or reached (writer includes reader); an empty list is allowed
    # (the token then holds no permission).
    reader = await admin.call("POST", post, json={"name": "ro", "roles": ["reader"]})
    assert reader.status == 201 and reader.body["roles"] == ["reader"]
    assert await admin.proxy_status(reader.body["token"]) == 200
    empty = await admin.call("POST", post, json={"name": "none", "roles": []})
    assert empty.status == 201 and empty.body["roles"] == []
    assert await admin.proxy_status(empty.body["token"]) == 403
    lower = await admin.call("POST", post, json={"name": "zone", "expires_at": "2099-01-01t10:00:00+02:00"})
    assert lower.status == 201 and lower.body["expires_at"] == "2099-01-01T08:00:00Z"


async def test_changes_apply_at_once_on_this_instance(admin: Admin) -> None:
    """No sleep anywhere: the admin API's instance evicts what it cached before answering."""
    first = (await issue(admin, "svc", "a"))["token"]
    second = (await issue(admin, "svc", "b"))["token"]
    assert await admin.proxy_status(first) == 200  # now cached by this instance
    assert (await admin.call("POST", "/v1/service-users/svc/tokens/a/expire")).status == 200
    assert await admin.proxy_status(first) == 401

    assert await admin.proxy_status(second) == 200
    assert (await admin.call("PATCH", "/v1/service-users/svc", json={"roles": ["other"]})).status == 200
    assert await admin.proxy_status(second) == 403  # writer is gone: echo:read no longer granted
    assert (await admin.call("PATCH", "/v1/service-users/svc", json={"disabled": True})).status == 200
    assert await admin.proxy_status(second) == 401
    assert (await admin.call("PATCH", "/v1/service-users/svc", json={"disabled": False})).status == 200
    assert (await admin.call("PATCH", "/v1/service-users/svc", json={"roles": ["writer"]})).status == 200
    assert await admin.proxy_status(second) == 200
    assert (await admin.call("DELETE", "/v1/service-users/svc/tokens/b")).status == 204
    assert await admin.proxy_status(second) == 401


async def test_every_answer_carrying_a_secret_is_no_store_and_no_other_is(admin: Admin) -> None:
    created = await admin.call("POST", "/v1/service-users", json={"name": "svc", "roles": ["reader"]})
    assert "Cache-Control" not in created.headers
    issued = await admin.call("POST", "/v1/service-users/svc/tokens", json={"name": "t"})
    reset = await admin.call("POST", "/v1/service-users/svc/tokens/t/reset")
    key = await admin.call("POST", "/v1/service-users/svc/keys", json={})
    for answer, field in ((issued, "token"), (reset, "token"), (key, "secret")):
        assert answer.status in (200, 201) and answer.body[field], answer.text
        assert answer.headers["Cache-Control"] == "no-store", answer.headers
    listed = await admin.call("GET", "/v1/service-users/svc/tokens")
    assert "Cache-Control" not in listed.headers and "token" not in listed.body["items"][0]
