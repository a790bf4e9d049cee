"""The request pipeline end to end: real gateway, real upstream, real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from tests.conftest import Harness, eventually
from tests.upstream import header_values


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_permitted_request_reaches_upstream_with_identity(harness: Harness) -> None:
    token = await harness.token("ci-job", roles=["writer"])
    response = await harness.send("GET", "/echo/items?x=1&y=%2F", headers=bearer(token))
    assert response.status == 200
    echo = await response.json()
    assert echo["raw_path"] == "/echo/items"
    assert echo["query"] == "x=1&y=%2F"
    assert header_values(echo, "X-Service-User") == ["ci-job"]
    assert header_values(echo, "X-Service-User-Roles") == ["writer"]
    (token_id,) = header_values(echo, "X-Service-Token-Id")
    assert token_id.startswith("tok_") and token not in str(echo)
    assert header_values(echo, "Authorization") == []
    request_id = response.headers["X-Request-Id"]
    assert header_values(echo, "X-Request-Id") == [request_id]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/nowhere", {}, 404, "no_route"),
        ("GET", "/echoX", {}, 404, "no_route"),
        ("GET", "/echo/a/../b", {}, 400, "bad_request"),
        ("GET", "/echo/a/%2e%2E/b", {}, 400, "bad_request"),
        ("GET", "/echo/a%2Fb", {}, 400, "bad_request"),
        ("GET", "/echo/a%5Cb", {}, 400, "bad_request"),
        ("GET", "/echo/a;jsessionid=1", {}, 400, "bad_request"),
        ("GET", "/echo/a%00b", {}, 400, "bad_request"),
        ("GET", "/echo//a", {}, 400, "bad_request"),
        ("GET", "/echo/%zz", {}, 400, "bad_request"),
        ("GET", "/echo/a", {}, 401, "missing_token"),
        ("GET", "/echo/a", {"Authorization": "Bearer nonsense"}, 401, "invalid_token"),
        ("GET", "/echo/a", {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "invalid_token"),
    ],
)
async def test_refusals_are_contract_json(
    harness: Harness, method: str, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    response = await harness.send(method, path, headers=headers)
    assert response.status == status
    body = await response.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]
    assert response.headers["X-Request-Id"]
    assert response.content_type == "application/json"


async def test_www_authenticate_headers(harness: Harness) -> None:
    missing = await harness.client.get("/echo/a")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    invalid = await harness.client.get("/echo/a", headers=bearer("gw_" + "A" * 49))
    assert invalid.headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'


async def test_bearer_scheme_is_case_insensitive(harness: Harness) -> None:
    token = await harness.token()
    response = await harness.client.get("/echo/a", headers={"Authorization": f"bEaReR {token}"})
    assert response.status == 200


async def test_forbidden_names_the_permission_and_unmatched_rule(harness: Harness) -> None:
    token = await harness.token("reader-user", roles=["reader"])
    response = await harness.client.post("/echo/a", headers=bearer(token), data=b"x")
    assert response.status == 403
    body = await response.json()
    assert body == {"error": "forbidden", "detail": "permission 'echo:write' is required"}
    unmatched = await harness.client.request("OPTIONS", "/echo/a", headers=bearer(token))
    assert unmatched.status == 403
    assert "no rule" in (await unmatched.json())["detail"]


async def test_no_rule_match_still_requires_a_token_first(harness: Harness) -> None:
    response = await harness.client.request("OPTIONS", "/echo/a")
    assert response.status == 401
    assert (await response.json())["error"] == "missing_token"


async def test_longest_prefix_wins(harness: Harness) -> None:
    token = await harness.token("writer-only", roles=["writer"])
    # /echo/deep belongs to route `deep` (needs other:read), not to the shorter /echo.
    deep = await harness.client.get("/echo/deep/x", headers=bearer(token))
    assert deep.status == 403
    assert (await deep.json())["detail"] == "permission 'other:read' is required"
    shallow = await harness.client.get("/echo/deeper", headers=bearer(token))
    assert shallow.status == 200


async def test_public_rule_forwards_without_token_and_without_identity(harness: Harness) -> None:
    response = await harness.client.post(
        "/echo/hook",
        data=b"{}",
        headers={"X-Service-User": "root", "Authorization": "Bearer whatever"},
    )
    assert response.status == 200
    echo = await response.json()
    assert header_values(echo, "X-Service-User") == []
    assert header_values(echo, "Authorization") == []


async def test_strip_prefix_sends_the_rest(harness: Harness) -> None:
    token = await harness.token()
    response = await harness.client.get("/strip/a/b?q=1", headers=bearer(token))
    assert (await response.json())["raw_path"] == "/a/b"
    root = await harness.client.get("/strip", headers=bearer(token))
    assert (await root.json())["raw_path"] == "/"


async def test_upstream_receives_the_canonical_path(harness: Harness) -> None:
    token = await harness.token()
    response = await harness.send("GET", "/echo/caf%C3%A9/%41b%7e", headers=bearer(token))
    assert response.status == 200
    assert (await response.json())["raw_path"] == "/echo/caf%C3%A9/Ab~"


async def test_token_roles_subset_and_empty_roles(harness: Harness) -> None:
    token = await harness.token("two-roles", roles=["writer", "other"], token_roles=["other"])
    response = await harness.client.get("/echo/deep/x", headers=bearer(token))
    echo = await response.json()
    assert header_values(echo, "X-Service-User-Roles") == ["other"]
    assert (await harness.client.get("/echo/a", headers=bearer(token))).status == 403


async def test_expired_token_and_disabled_user(harness: Harness) -> None:
    token = await harness.token("soon-gone")
    await harness.directory.expire_token("soon-gone", "t0", actor="test")
    await eventually(lambda: refused_with(harness, token, "token_expired"))  # through the change feed
    response = await harness.client.get("/echo/a", headers=bearer(token))
    body = await response.json()
    assert response.status == 401 and body["error"] == "token_expired"
    assert body["detail"].startswith("token 't0' expired on ")
    other = await harness.token("to-disable")
    assert (await harness.client.get("/echo/a", headers=bearer(other))).status == 200  # cached now
    await harness.directory.update_user("to-disable", actor="test", disabled=True)
    await eventually(lambda: refused_with(harness, other, "user_disabled"))


async def test_revocation_reaches_a_cached_identity(harness: Harness) -> None:
    token = await harness.token("revoked")
    assert (await harness.client.get("/echo/a", headers=bearer(token))).status == 200
    await harness.directory.reset_token("revoked", "t0", actor="test")
    await eventually(lambda: refused_with(harness, token, "invalid_token"))


async def refused_with(harness: Harness, token: str, code: str) -> bool:
    """Whether GET /echo/a with `token` is now refused with `code`."""
    response = await harness.client.get("/echo/a", headers=bearer(token))
    return response.status == 401 and (await response.json())["error"] == code


async def test_request_id_kept_or_generated(harness: Harness) -> None:
    token = await harness.token()
    kept = await harness.client.get("/echo/a", headers={**bearer(token), "X-Request-Id": "abc-123"})
    assert kept.headers["X-Request-Id"] == "abc-123"
    assert header_values(await kept.json(), "X-Request-Id") == ["abc-123"]
    bad = await harness.client.get("/echo/a", headers={**bearer(token), "X-Request-Id": "a b\tc"})
    assert bad.headers["X-Request-Id"] != "a b\tc" and len(bad.headers["X-Request-Id"]) == 32


async def test_two_authorization_headers_are_refused(harness: Harness) -> None:
    token = await harness.token()
    response = await harness.client.get(
        "/echo/a", headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    )
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"


async def test_admin_token_never_passes_the_proxy(harness: Harness) -> None:
    await harness.directory.create_user("root-admin", actor="test", admin=True)
    _, secret = await harness.directory.create_token("root-admin", "adm", actor="test")
    response = await harness.client.get("/echo/a", headers=bearer(secret))
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"
