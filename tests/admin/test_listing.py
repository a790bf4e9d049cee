"""Read-only admin endpoints (roles, routes, audit events), malformed requests, metrics and CORS."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.admin.conftest import Admin, assert_error, issue

MakeAdmin = Callable[..., Awaitable[Admin]]


async def test_roles_and_routes(make_admin: MakeAdmin) -> None:
    admin = await make_admin(
        route_options="""
        cors:
          origins: {store: true, extra: ["https://fixed.example"]}
          allow_headers: [Authorization]
          max_age: 60
        """
    )
    roles = await admin.call("GET", "/v1/roles")
    assert roles.status == 200
    by_name = {role["name"]: role for role in roles.body["items"]}
    assert list(by_name) == sorted(by_name)
    assert by_name["writer"] == {
        "name": "writer",
        "description": None,
        "permissions": ["echo:write"],
        "includes": ["reader"],
    }
    assert by_name["service-user-project-admin"]["permissions"] == ["*"]
    assert by_name["service-user-project-admin"]["description"] == "Every permission"

    routes = await admin.call("GET", "/v1/routes")
    assert routes.status == 200
    by_route = {route["name"]: route for route in routes.body["items"]}
    assert by_route["echo"] == {
        "name": "echo",
        "prefix": "/echo",
        "upstream": admin.gateway.config.routes[0].upstream,
        "timeout": 2,
        "strip_prefix": False,
        "preserve_host": False,
        "cors": {
            "origins": {"store": True, "extra": ["https://fixed.example"]},
            "allow_headers": ["Authorization"],
            "expose_headers": ["X-Request-Id"],
            "max_age": 60,
        },
    }
    assert by_route["strip"]["strip_prefix"] is True and by_route["strip"]["cors"] is None


async def test_audit_events_and_filters(admin: Admin) -> None:
    await admin.gateway.directory.create_user("by-cli", actor="cli:alice")
    await issue(admin, "svc", "t1")
    everything = await admin.call("GET", "/v1/audit-events")
    assert everything.status == 200
    events = everything.body["items"]
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
    for event in events:
        assert set(event) == {"id", "at", "actor", "action", "target", "detail"}
        assert event["at"].endswith("Z")
    mine = (await admin.call("GET", "/v1/audit-events?actor=root")).body["items"]
    assert [(e["action"], e["target"]) for e in mine] == [
        ("token.created", "token/svc/t1"),
        ("user.created", "user/svc"),
    ]
    cli = (await admin.call("GET", "/v1/audit-events?actor=cli:alice")).body["items"]
    assert [e["target"] for e in cli] == ["user/by-cli"]
    assert len((await admin.call("GET", "/v1/audit-events?limit=1")).body["items"]) == 1
    assert (await admin.call("GET", "/v1/audit-events?since=2099-01-01")).body["items"] == []
    oldest = events[-1]["at"]
    assert len((await admin.call("GET", f"/v1/audit-events?since={oldest}")).body["items"]) == len(events)
    for query, field in (
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("limit=-1", "limit"),
        ("limit=1&limit=2", "limit"),
        ("since=yesterday", "since"),
        ("since=0001-01-01T00:00:00%2B01:00", "since"),
        ("actor=%00", "actor"),
    ):
        assert_error(await admin.call("GET", f"/v1/audit-events?{query}"), 422, "invalid", field)


async def test_malformed_requests_get_json_errors(admin: Admin) -> None:
    post = "/v1/service-users"
    json_type = {"Content-Type": "application/json"}
    for data, headers in (
        ("{not json", json_type),
        ("[1, 2]", json_type),
        ('"text"', json_type),
        ("", json_type),
        ('{"name": "a", "name": "b"}', json_type),
        ('{"name": NaN}', json_type),
        ("[" * 30_000 + "]" * 30_000, json_type),
        (b"\xff\xfe", json_type),
        ('{"name": "form"}', {"Content-Type": "text/plain"}),
        ("name=form", {"Content-Type": "application/x-www-form-urlencoded"}),
    ):
        answer = await admin.call("POST", post, data=data, headers=headers)
        assert_error(answer, 400, "bad_request")
    huge = await admin.call("POST", post, data='{"name": "' + "x" * 200_000 + '"}', headers=json_type)
    assert_error(huge, 413, "body_too_large")
    surrogate = await admin.call(
        "POST", post, data='{"name": "ok", "description": "\\ud800"}', headers=json_type
    )
    assert_error(surrogate, 422, "invalid", "description")

    for path in ("/v1/nothing", "/nothing", "/v1", "/v1/service-users/a/b/c/d/e"):
        assert_error(await admin.call("GET", path), 404, "not_found")
    for method, path in (("PUT", "/v1/roles"), ("DELETE", "/v1/service-users"), ("HEAD", "/v1/roles")):
        answer = await admin.call(method, path)
        assert answer.status == 405, (method, path)
        assert answer.headers["Allow"] and answer.headers["X-Request-Id"]
        if method != "HEAD":
            assert answer.body["error"] == "method_not_allowed"
    assert [u["name"] for u in (await admin.call("GET", post)).body["items"]] == ["root"]


async def test_metrics_count_proxied_requests_refusals_and_cache(admin: Admin) -> None:
    secret = (await issue(admin))["token"]
    for _ in range(3):
        assert await admin.proxy_status(secret) == 200
    assert await admin.proxy_status("gw_garbage") == 401
    assert await admin.proxy_status(secret, "/nowhere") == 404
    metrics = await admin.call("GET", "/metrics", token=None)
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    lines = metrics.text.splitlines()

    def value(prefix: str) -> float:
        (line,) = [line for line in lines if line.startswith(prefix + " ")]
        return float(line.rsplit(" ", 1)[1])

    assert value('gateway_requests_total{route="echo",status="200"}') == 3
    assert value('gateway_requests_total{route="echo",status="401"}') == 1
    assert value('gateway_requests_total{route="",status="404"}') == 1
    assert value('gateway_refusals_total{reason="invalid_token"}') == 1
    assert value('gateway_refusals_total{reason="no_route"}') == 1
    assert value("gateway_token_cache_misses_total") >= 1
    assert value("gateway_token_cache_hits_total") >= 2
    assert value("gateway_store_healthy") == 1
    assert secret not in metrics.text


async def scrape(admin: Admin) -> dict[str, tuple[str, float]]:
    """/metrics parsed by prometheus_client's own text parser: sample name → (family type, value)."""
    text = (await admin.call("GET", "/metrics", token=None)).text
    return {
        sample.name: (family.type, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_metric_types_are_what_their_names_promise(admin: Admin) -> None:
    """The token cache totals are counters (promtool refuses a gauge named `*_total`)."""
    secret = (await issue(admin))["token"]
    for _ in range(3):
        assert await admin.proxy_status(secret) == 200
    samples = await scrape(admin)
    hits_type, hits = samples["gateway_token_cache_hits_total"]
    misses_type, misses = samples["gateway_token_cache_misses_total"]
    assert (hits_type, misses_type) == ("counter", "counter")
    assert hits >= 2 and misses >= 1
    for name, (kind, _) in samples.items():
        if name.endswith("_total"):
            assert kind == "counter", name
    # A later scrape counts on from the same totals (nothing reset or doubled).
    assert await admin.proxy_status(secret) == 200
    assert (await scrape(admin))["gateway_token_cache_hits_total"] == ("counter", hits + 1)


async def test_admin_cors_when_origins_are_configured(make_admin: MakeAdmin) -> None:
    admin = await make_admin(extra_yaml='admin:\n  cors_origins: ["https://console.example"]\n')
    preflight = {
        "Origin": "https://console.example",
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    }
    allowed = await admin.call("OPTIONS", "/v1/service-users/x", token=None, headers=preflight)
    assert allowed.status == 200, allowed.text
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://console.example"
    assert allowed.headers["Access-Control-Allow-Methods"] == "PATCH"
    other = await admin.call(
        "OPTIONS", "/v1/service-users/x", token=None, headers={**preflight, "Origin": "https://evil.example"}
    )
    assert_error(other, 403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in other.headers

    actual = await admin.call("GET", "/v1/roles", headers={"Origin": "https://console.example"})
    assert actual.status == 200
    assert actual.headers["Access-Control-Allow-Origin"] == "https://console.example"
    assert actual.headers["Access-Control-Expose-Headers"] == "X-Request-Id"
    assert actual.headers["Vary"] == "Origin"
    refused = await admin.call("GET", "/v1/roles", token=None, headers={"Origin": "https://console.example"})
    assert_error(refused, 401, "missing_token")  # the page can read why
    assert refused.headers["Access-Control-Allow-Origin"] == "https://console.example"
    stranger = await admin.call("GET", "/v1/roles", headers={"Origin": "https://evil.example"})
    assert stranger.status == 200 and "Access-Control-Allow-Origin" not in stranger.headers


async def test_no_admin_cors_by_default(admin: Admin) -> None:
    preflight = {"Origin": "https://console.example", "Access-Control-Request-Method": "GET"}
    answer = await admin.call("OPTIONS", "/v1/roles", token=None, headers=preflight)
    assert_error(answer, 401, "missing_token")
    actual = await admin.call("GET", "/v1/roles", headers={"Origin": "https://console.example"})
    assert actual.status == 200 and "Access-Control-Allow-Origin" not in actual.headers


async def test_openapi_describes_every_endpoint_of_the_listener(admin: Admin) -> None:
    document = (await admin.call("GET", "/openapi.json", token=None)).body
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in admin.client.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        # The console's page and files are for browsers, not part of the API (README "Console").
        and not route.resource.canonical.startswith("/console")
    }
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert served == described
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            if path.startswith("/v1/"):
                assert {"400", "401", "403", "503"} <= statuses, (method, path)
                assert "security" not in operation  # the document-wide bearer requirement applies
            else:
                assert operation["security"] == []
            if "requestBody" in operation:
                assert {"413", "422"} <= statuses, (method, path)
    roles = document["components"]["schemas"]["NewUser"]["properties"]["roles"]["anyOf"][0]["items"]
    assert roles["enum"] == ["other", "reader", "service-user-project-admin", "writer"]


async def test_audit_events_about_one_user_its_tokens_and_keys(admin: Admin) -> None:
    for name in ("svc", "svc2", "svc_x"):
        created = await admin.call("POST", "/v1/service-users", json={"name": name, "roles": ["reader"]})
        assert created.status == 201, created.text
    assert (await admin.call("POST", "/v1/service-users/svc/tokens", json={"name": "t"})).status == 201
    assert (await admin.call("POST", "/v1/service-users/svc/keys", json={})).status == 201
    assert (await admin.call("POST", "/v1/service-users/svc2/tokens", json={"name": "t"})).status == 201
    about = await admin.call("GET", "/v1/audit-events?user=svc")
    assert about.status == 200, about.text
    targets = [event["target"] for event in about.body["items"]]
    assert targets[0].startswith("key/svc/") and targets[1:] == ["token/svc/t", "user/svc"]
    # "svc" is not a prefix match: svc2's and svc_x's events stay out (and `_` is no wildcard).
    assert [e["target"] for e in (await admin.call("GET", "/v1/audit-events?user=svc_")).body["items"]] == []
