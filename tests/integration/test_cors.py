"""CORS on the proxy, header by header: per-user origins from the store, fixed origins, preflights."""

from __future__ import annotations

from tests.conftest import Harness, eventually
from tests.upstream import SEEN

APP = "http://app.example:3000"
OTHER = "http://other.example"
FIXED = "http://fixed.example:8000"


async def browser_user(harness: Harness, name: str = "spa", origins: list[str] | None = None) -> str:
    await harness.directory.create_user(name, actor="test", roles=["reader"], origins=origins or [APP])
    _, token = await harness.directory.create_token(name, "web", actor="test")
    await harness.settle()
    return token


def preflight_headers(origin: str, method: str = "PUT") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_preflight_for_a_stored_origin_is_answered_not_forwarded(harness: Harness) -> None:
    await browser_user(harness)
    seen = harness.upstream_app[SEEN]
    before = len(seen)
    response = await harness.client.options("/app/items", headers=preflight_headers(APP))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert response.headers["Access-Control-Allow-Methods"] == "PUT"
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in response.headers["Vary"]
    assert len(seen) == before


async def test_preflight_for_unknown_origin_is_403_json_without_allow_origin(harness: Harness) -> None:
    await browser_user(harness)
    response = await harness.client.options("/app/items", headers=preflight_headers(OTHER))
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers
    null = await harness.client.options("/app/items", headers=preflight_headers("null"))
    assert null.status == 403


async def test_fixed_origin_preflight_needs_no_user(harness: Harness) -> None:
    response = await harness.client.options("/app/x", headers=preflight_headers(FIXED))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == FIXED


async def test_actual_request_from_users_origin_gets_cors_headers(harness: Harness) -> None:
    token = await browser_user(harness)
    response = await harness.client.get(
        "/app/items?cors=1", headers={"Origin": APP, "Authorization": f"Bearer {token}"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == APP  # the upstream's "*" was removed
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert response.headers["Vary"] == "Origin"
    assert response.headers["Access-Control-Expose-Headers"] == "X-Request-Id"


async def test_origin_normalised_before_comparison(harness: Harness) -> None:
    token = await browser_user(harness, origins=["https://App.Example:443"])
    response = await harness.client.get(
        "/app/items", headers={"Origin": "https://app.example", "Authorization": f"Bearer {token}"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_origin_of_another_user_is_refused(harness: Harness) -> None:
    await browser_user(harness, "first", origins=[OTHER])
    token = await browser_user(harness, "second", origins=[APP])
    response = await harness.client.get(
        "/app/items", headers={"Origin": OTHER, "Authorization": f"Bearer {token}"}
    )
    assert response.status == 403
    assert (await response.json())["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_refusals_carry_cors_headers_for_allowed_origins(harness: Harness) -> None:
    await browser_user(harness)
    missing = await harness.client.get("/app/items", headers={"Origin": APP})
    assert missing.status == 401
    assert missing.headers["Access-Control-Allow-Origin"] == APP
    unknown = await harness.client.get("/app/items", headers={"Origin": OTHER})
    assert unknown.status == 401
    assert "Access-Control-Allow-Origin" not in unknown.headers


async def test_forbidden_with_allowed_origin_is_readable(harness: Harness) -> None:
    await harness.directory.create_user("weak", actor="test", roles=["other"], origins=[APP])
    _, token = await harness.directory.create_token("weak", "w", actor="test")
    await harness.settle()
    response = await harness.client.get(
        "/app/items", headers={"Origin": APP, "Authorization": f"Bearer {token}"}
    )
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"
    assert response.headers["Access-Control-Allow-Origin"] == APP


async def test_fixed_origin_valid_for_every_user(harness: Harness) -> None:
    token = await browser_user(harness)
    response = await harness.client.get(
        "/app/items", headers={"Origin": FIXED, "Authorization": f"Bearer {token}"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == FIXED


async def test_origin_removal_applies_and_disabled_users_do_not_count(harness: Harness) -> None:
    token = await browser_user(harness)
    ok = await harness.client.options("/app/items", headers=preflight_headers(APP))
    assert ok.status == 204
    await harness.directory.update_user("spa", actor="test", remove_origins=[APP])
    await eventually(lambda: preflight_status(harness, 403))  # through the change feed
    refused = await harness.client.get(
        "/app/items", headers={"Origin": APP, "Authorization": f"Bearer {token}"}
    )
    assert refused.status == 403
    assert (await harness.client.options("/app/items", headers=preflight_headers(APP))).status == 403
    await harness.directory.update_user("spa", actor="test", add_origins=[APP])
    await eventually(lambda: preflight_status(harness, 204))
    await harness.directory.update_user("spa", actor="test", disabled=True)
    await eventually(lambda: preflight_status(harness, 403))


async def preflight_status(harness: Harness, status: int) -> bool:
    """Whether a preflight for APP to /app/items now answers `status`."""
    return (await harness.client.options("/app/items", headers=preflight_headers(APP))).status == status


async def test_routes_without_cors_leave_origin_to_the_upstream(harness: Harness) -> None:
    token = await harness.token()
    response = await harness.client.get(
        "/echo/a?cors=1", headers={"Origin": OTHER, "Authorization": f"Bearer {token}"}
    )
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    preflight = await harness.client.options("/echo/a", headers=preflight_headers(OTHER))
    assert preflight.status == 401  # no cors block: an OPTIONS is an ordinary request


async def test_public_rule_with_origin(harness: Harness) -> None:
    await browser_user(harness)
    allowed = await harness.client.post("/app/public", headers={"Origin": APP}, data=b"{}")
    assert allowed.status == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == APP
    refused = await harness.client.post("/app/public", headers={"Origin": OTHER}, data=b"{}")
    assert refused.status == 403
