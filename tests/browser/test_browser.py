"""CORS in a real browser: Debian's chromium driven by playwright, page and gateway on two loopback origins.

The page is the README's own example ("Calling the gateway from a browser app"), so the
example a new user copies is the one proven here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Harness

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def readme_page() -> str:
    text = README.read_text()
    section = text.split("## Calling the gateway from a browser app", 1)[1]
    match = re.search(r"```html\n(.*?)```", section, re.S)
    assert match is not None, "README's browser section has no ```html example"
    return match.group(1)


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """The README example page, served from its own loopback origin."""
    html = readme_page()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def run_page(browser: Any, origin: str, gateway_url: str, token: str, button: str) -> str:
    page = await browser.new_page()
    try:
        await page.goto(origin + "/")
        await page.fill("#gateway", gateway_url)
        await page.fill("#token", token)
        await page.click(f"#{button}")
        await page.wait_for_function(
            "document.getElementById('result').textContent.length > 0", timeout=10000
        )
        return str(await page.text_content("#result"))
    finally:
        await page.close()


async def make_browser_user(harness: Harness, origins: list[str]) -> str:
    await harness.directory.create_user("spa", actor="test", roles=["reader"], origins=origins)
    _, token = await harness.directory.create_token("spa", "web", actor="test")
    await harness.settle()
    return token


async def test_call_succeeds_from_the_users_origin(harness: Harness, browser: Any, page_origin: str) -> None:
    token = await make_browser_user(harness, [page_origin])
    result = await run_page(
        browser, page_origin, f"http://127.0.0.1:{harness.client.port}/app/hello", token, "get"
    )
    assert result.startswith("200 (request "), result
    assert "null" not in result.splitlines()[0]  # X-Request-Id is exposed to the page
    assert '"X-Service-User", "spa"' in result or '["X-Service-User", "spa"]' in result


async def test_call_fails_as_cors_error_from_another_origin(
    harness: Harness, browser: Any, page_origin: str
) -> None:
    token = await make_browser_user(harness, ["http://127.0.0.1:1"])
    result = await run_page(
        browser, page_origin, f"http://127.0.0.1:{harness.client.port}/app/hello", token, "get"
    )
    assert result.startswith("CORS or network error"), result


async def test_put_with_json_passes_its_preflight(harness: Harness, browser: Any, page_origin: str) -> None:
    token = await make_browser_user(harness, [page_origin])
    result = await run_page(
        browser, page_origin, f"http://127.0.0.1:{harness.client.port}/app/hello", token, "put"
    )
    assert result.startswith("200 "), result
    assert '"method": "PUT"' in result
    assert '"body_bytes": 19' in result  # {"hello":"gateway"}
