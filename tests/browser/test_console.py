"""The admin console (README "Console", CONTRACT.md "Console") in Debian's Chromium.

The real gateway runs in this process on the real store, with its admin listener and its proxy
listener on loopback ports; the browser loads /console/ from the admin listener and drives it
only through the accessible names CONTRACT.md lists. Screenshots go to GATEWAY_TEST_ARTIFACTS
(else tmp_path); with GATEWAY_TEST_SCREENSHOTS=1 the README's two are rewritten as well.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin import build_admin_app
from gateway.app import Gateway
from gateway.config import load_config
from tests.admin.conftest import Admin
from tests.conftest import proxy_test_server, write_config

CONSOLE = Path(__file__).resolve().parent.parent.parent / "gateway" / "console"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
TOKEN_KEY = "gateway.adminToken"
XSS = "<img src=x onerror=alert(1)>"
WAIT = 20_000  # ms: generous, bounded (the CPU is shared with other runs)


@pytest.fixture
async def admin(tmp_path: Path, store_url: str, upstream: TestServer) -> AsyncIterator[Admin]:
    """The real gateway with admin listener, proxy listener, an admin `root` and its token `adm`."""
    upstream_url = str(upstream.make_url("")).rstrip("/")
    path = write_config(tmp_path, store_url=store_url, upstream_url=upstream_url)
    gateway = await Gateway.open(load_config(path, env={}))
    client = TestClient(TestServer(build_admin_app(gateway.admin_context()), host="127.0.0.1"))
    proxy = TestClient(proxy_test_server(gateway))
    try:
        await client.start_server()
        await proxy.start_server()
        await gateway.directory.create_user("root", actor="test", admin=True)
        _, secret = await gateway.directory.create_token("root", "adm", actor="test")
        yield Admin(gateway, client, proxy, secret, path)
    finally:
        await proxy.close()
        await client.close()
        await gateway.close()


@dataclass
class Tab:
    """One browser page on the console, with everything it said on the side."""

    page: Any
    url: str
    console: list[str] = field(default_factory=list)  # every console message, "type: text"
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt messages (none expected)
    visited: list[str] = field(default_factory=list)  # every URL the page navigated to

    async def sign_in(self, token: str) -> None:
        await self.page.goto(self.url)
        await self.page.get_by_label("Admin token").fill(token)
        await self.page.get_by_role("button", name="Sign in").click()
        await self.page.get_by_role("heading", name="Service users", level=1).wait_for(timeout=WAIT)
        await self.page.locator(".list > *").first.wait_for(timeout=WAIT)  # the first page is in

    async def storage(self) -> dict[str, dict[str, str]]:
        """Everything in the tab's sessionStorage and localStorage."""
        found: dict[str, dict[str, str]] = await self.page.evaluate(
            """() => Object.fromEntries(['sessionStorage', 'localStorage'].map((area) =>
                 [area, Object.fromEntries(Object.entries(window[area]))]))"""
        )
        return found

    async def status(self, text: str) -> None:
        """Wait until the status region says `text`."""
        await self.page.locator("#status").get_by_text(text).wait_for(timeout=WAIT)


@pytest.fixture
async def open_tab(browser: Any, admin: Admin) -> AsyncIterator[Callable[..., Awaitable[Tab]]]:
    """Factory: a fresh browser context (1280×800 unless told) on the console."""
    contexts: list[Any] = []

    async def make(width: int = 1280, height: int = 800, init_script: str | None = None) -> Tab:
        context = await browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        if init_script is not None:
            await context.add_init_script(init_script)
        page = await context.new_page()
        page.set_default_timeout(WAIT)
        tab = Tab(page, f"http://127.0.0.1:{admin.client.port}/console/")
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: tab.console.append(f"pageerror: {error}"))

        async def on_dialog(dialog: Any) -> None:
            tab.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("framenavigated", lambda frame: tab.visited.append(frame.url))
        return tab

    yield make
    for context in contexts:
        await context.close()


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS") or tmp_path) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Save a PNG as a test artefact; with GATEWAY_TEST_SCREENSHOTS=1 also as the README's."""
    target = artifacts(tmp_path) / name
    await page.screenshot(path=str(target), full_page=False)
    assert target.stat().st_size > 1000
    if os.environ.get("GATEWAY_TEST_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copyfile(target, SCREENSHOTS / name)


async def read_secret(page: Any, prefix: str) -> str:
    """The secret the show-once dialog holds, after checking the dialog's promises."""
    dialog = page.get_by_role("dialog")
    await dialog.wait_for(timeout=WAIT)
    assert "will not be shown again" in (await dialog.inner_text())
    await dialog.get_by_role("button", name="Copy").wait_for()
    secret = str(await dialog.locator("code.secret").text_content())
    assert secret.startswith(prefix), secret
    return secret


async def close_secret(page: Any, secret: str, *, keyboard: bool = False) -> None:
    if keyboard:
        await page.keyboard.press("Escape")
    else:
        await page.get_by_role("dialog").get_by_role("button", name="Close").click()
    await page.locator("dialog").wait_for(state="detached", timeout=WAIT)  # closed and removed
    assert secret not in await page.content()
    assert secret not in await page.evaluate("() => document.body.innerText")


async def proxy_status(admin: Admin, secret: str) -> int:
    await admin.gateway.catch_up()
    return await admin.proxy_status(secret)


def row(page: Any, name: str) -> Any:
    return page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=name, exact=True))


# ---------------------------------------------------------------------------------------------
# The answers themselves (no browser)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_console_answers_carry_the_security_headers(admin: Admin) -> None:
    redirect = await admin.client.get("/console", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/console/"
    assert redirect.headers["Content-Security-Policy"] == CSP
    types = {
        "/console/": "text/html; charset=utf-8",
        "/console/console.js": "text/javascript; charset=utf-8",
        "/console/console.css": "text/css; charset=utf-8",
        "/console/favicon.svg": "image/svg+xml",
    }
    for path, content_type in types.items():
        answer = await admin.call("GET", path, token=None)
        assert answer.status == 200, (path, answer.text)
        assert answer.headers["Content-Type"] == content_type
        assert answer.headers["Content-Security-Policy"] == CSP
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["Cache-Control"] == "no-cache"
        assert "Set-Cookie" not in answer.headers
    for path in ("/console/nope.js", "/console/..%2fadmin.py", "/console/__init__.py"):
        missing = await admin.call("GET", path, token=None)
        assert missing.status == 404 and missing.body["error"] == "not_found", path
        assert missing.headers["Content-Security-Policy"] == CSP  # errors too
    # The API's own answers are untouched (no page there to protect).
    assert "Content-Security-Policy" not in (await admin.call("GET", "/v1/roles")).headers


def test_console_files_need_no_inline_script_and_never_parse_data_as_html() -> None:
    html = (CONSOLE / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="console.js">']
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from elsewhere (no CDN)
    source = (CONSOLE / "console.js").read_text()
    script = "\n".join(line for line in source.splitlines() if not line.strip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "console." not in script  # no console.log of anything
    assert "localStorage" not in script and "document.cookie" not in script
    assert script.count("sessionStorage.setItem(") == 1  # the admin token, and nothing else


# ---------------------------------------------------------------------------------------------
# Every flow, in the browser


async def test_service_user_life_through_the_console(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]]
) -> None:
    tab = await open_tab()
    page = tab.page
    # Signing in by keyboard: the token field has focus, Enter submits.
    await page.goto(tab.url)
    assert await page.evaluate("() => document.activeElement.id") == "admin-token"
    await page.keyboard.insert_text(admin.token)
    await page.keyboard.press("Enter")
    await page.get_by_role("heading", name="Service users", level=1).wait_for()
    assert (await tab.storage())["sessionStorage"] == {TOKEN_KEY: admin.token}

    # A user with two roles and an origin.
    await page.get_by_role("button", name="New service user").click()
    await page.get_by_label("Name").fill("billing")
    await page.get_by_label("Description").fill("invoices nightly")
    await page.get_by_label("Roles").select_option(["reader", "writer"])
    await page.get_by_label("Origins").fill("https://app.example")
    await page.get_by_role("button", name="Create").click()
    await page.get_by_role("heading", name="billing", level=1).wait_for()
    roles = page.get_by_role("table", name="Roles")
    await row(page, "writer").wait_for()
    assert "root" in await row(page, "reader").inner_text()  # assigned_by: the admin
    assert await roles.get_by_role("row").count() == 3  # header + two roles
    assert await page.locator("main").get_by_role("listitem").all_text_contents() == ["https://app.example"]
    user = await admin.call("GET", "/v1/service-users/billing")
    assert [role["name"] for role in user.body["roles"]] == ["reader", "writer"]
    assert user.body["allowed_origins"] == ["https://app.example"]

    # A token, read from its dialog, works through the proxy.
    await page.get_by_role("button", name="New token").click()
    await page.get_by_label("Name").fill("ci")
    await page.get_by_label("Expires at").fill("2099-01-01")
    await page.get_by_role("button", name="Create").click()
    first = await read_secret(page, "gw_")
    await close_secret(page, first, keyboard=True)
    assert await proxy_status(admin, first) == 200

    # Reset, once confirmed: a new secret in the dialog; the old one is dead at once.
    await row(page, "ci").get_by_role("button", name="Reset").click()
    confirm = page.get_by_role("dialog")
    assert "Reset token ci?" in await confirm.inner_text()
    await confirm.get_by_role("button", name="Cancel").click()
    await confirm.wait_for(state="detached")
    assert await proxy_status(admin, first) == 200
    await row(page, "ci").get_by_role("button", name="Reset").click()
    await page.get_by_role("dialog").get_by_role("button", name="Reset").click()
    second = await read_secret(page, "gw_")
    assert second != first
    await close_secret(page, second)
    assert await proxy_status(admin, first) == 401
    assert await proxy_status(admin, second) == 200

    # Expire now: the next proxied call is refused.
    await row(page, "ci").get_by_role("button", name="Expire now").click()
    await tab.status("Token ci expired.")
    assert "expired" in await row(page, "ci").inner_text()
    assert await proxy_status(admin, second) == 401

    # Delete a token, once confirmed.
    await row(page, "ci").get_by_role("button", name="Delete").click()
    confirm = page.get_by_role("dialog")
    assert "Delete token ci?" in await confirm.inner_text()
    await confirm.get_by_role("button", name="Delete").click()
    await tab.status("Token ci deleted.")
    tokens = (await admin.call("GET", "/v1/service-users/billing/tokens")).body["items"]
    assert [token["name"] for token in tokens] == []

    # Disable: its other token stops passing; Enable is offered.
    await page.get_by_role("button", name="New token").click()
    await page.get_by_label("Name").fill("other")
    await page.get_by_role("button", name="Create").click()
    third = await read_secret(page, "gw_")
    await close_secret(page, third)
    assert await proxy_status(admin, third) == 200
    await page.get_by_role("button", name="Disable").click()
    await page.get_by_role("button", name="Enable").wait_for()
    assert (await admin.call("GET", "/v1/service-users/billing")).body["disabled"] is True
    assert await proxy_status(admin, third) != 200

    # Delete with a confirmation: Cancel keeps it, Delete removes it.
    await page.get_by_role("button", name="Delete", exact=True).first.click()
    confirm = page.get_by_role("dialog")
    assert "Delete service user billing?" in await confirm.inner_text()
    await confirm.get_by_role("button", name="Cancel").click()
    await confirm.wait_for(state="detached")
    assert (await admin.call("GET", "/v1/service-users/billing")).status == 200
    await page.locator(".toolbar").get_by_role("button", name="Delete", exact=True).click()
    await page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    await page.get_by_role("heading", name="Service users", level=1).wait_for()
    await tab.status("Service user billing deleted.")
    assert (await admin.call("GET", "/v1/service-users/billing")).status == 404

    # The audit log shows each action with the admin's name.
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_role("heading", name="Audit log", level=1).wait_for()
    await page.get_by_role("cell", name="user.deleted").wait_for()
    events = await page.evaluate(
        """() => Array.from(document.querySelectorAll('tbody tr'),
             (tr) => Array.from(tr.children, (cell) => cell.textContent))"""
    )
    mine = [(actor, action) for _, actor, action, target, _ in events if "billing" in target]
    assert {actor for actor, _ in mine} == {"root"}, events
    done = {action for _, action in mine}
    assert {
        "user.created",
        "token.created",
        "token.reset",
        "token.expired",
        "user.updated",
        "user.deleted",
    } <= done

    # No secret anywhere it could linger; nothing in the console; no cookie.
    for secret in (first, second, third):
        assert secret not in page.url
        assert all(secret not in url for url in tab.visited)
        assert all(secret not in message for message in tab.console)
        assert secret not in await page.content()
    assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+/console/(#/[a-z/.-]*)?", url) for url in tab.visited), (
        tab.visited
    )
    assert await tab.storage() == {"sessionStorage": {TOKEN_KEY: admin.token}, "localStorage": {}}
    assert await page.context.cookies() == []
    assert tab.console == [] and tab.dialogs == []  # no CSP violation, no error, no log line

    # Signing out forgets the token.
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("Admin token").wait_for()
    assert await tab.storage() == {"sessionStorage": {}, "localStorage": {}}


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_keys_and_copy_that_falls_back_to_selecting(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]]
) -> None:
    await admin.gateway.directory.create_user("backend", actor="test", roles=["reader"])
    # Plain HTTP to another host has no clipboard API: the page must select the text instead.
    tab = await open_tab(init_script="Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    page = tab.page
    await tab.sign_in(admin.token)
    await page.get_by_role("link", name="backend", exact=True).click()
    await page.get_by_role("heading", name="backend", level=1).wait_for()
    await page.get_by_role("button", name="New key").click()
    await page.get_by_label("Description").fill("orders")
    await page.get_by_role("button", name="Create").click()
    secret = await read_secret(page, "gwk_")
    dialog = page.get_by_role("dialog")
    await dialog.get_by_role("button", name="Copy").click()
    await dialog.get_by_text("Selected").wait_for()
    assert await page.evaluate("() => window.getSelection().toString()") == secret
    key_id = re.search(r"key_[0-9A-Za-z]{16}", await dialog.inner_text())
    assert key_id is not None
    await close_secret(page, secret)
    assert await page.evaluate("() => window.getSelection().toString()") == ""
    key_row = page.get_by_role("row").filter(has_text=key_id.group(0))
    await key_row.get_by_role("button", name="Expire now").click()
    await tab.status(f"API key {key_id.group(0)} expired")
    assert (await admin.call("GET", f"/v1/api-keys/{key_id.group(0)}")).body["expired"] is True
    await (
        page.get_by_role("row").filter(has_text=key_id.group(0)).get_by_role("button", name="Delete").click()
    )
    confirm = page.get_by_role("dialog")
    assert f"Delete API key {key_id.group(0)}?" in await confirm.inner_text()
    await confirm.get_by_role("button", name="Delete").click()
    await page.get_by_text("No API keys yet.").wait_for()
    assert (await admin.call("GET", f"/v1/api-keys/{key_id.group(0)}")).status == 404
    # The user's recent activity lists the key's events, by the admin.
    await page.get_by_role("cell", name="key.deleted").wait_for()
    assert tab.console == [] and tab.dialogs == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_copy_uses_the_clipboard_where_it_exists(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]]
) -> None:
    await admin.gateway.directory.create_user("backend", actor="test", roles=["reader"])
    tab = await open_tab()
    page = tab.page
    await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=tab.url[:-9])
    await tab.sign_in(admin.token)
    await page.goto(tab.url + "#/users/backend")
    await page.get_by_role("button", name="New token").click()
    await page.get_by_label("Name").fill("web")
    await page.get_by_role("button", name="Create").click()
    secret = await read_secret(page, "gw_")
    await page.get_by_role("dialog").get_by_role("button", name="Copy").click()
    await page.get_by_role("dialog").get_by_text("Copied to the clipboard.").wait_for()
    assert await page.evaluate("() => navigator.clipboard.readText()") == secret
    await close_secret(page, secret)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_store_values_render_as_text(admin: Admin, open_tab: Callable[..., Awaitable[Tab]]) -> None:
    await admin.gateway.directory.create_user("xss", actor="test", roles=["reader"], description=XSS)
    await admin.gateway.directory.create_token("xss", "t", actor="test", description=XSS)
    tab = await open_tab()
    page = tab.page
    await tab.sign_in(admin.token)
    await page.get_by_role("link", name="xss", exact=True).wait_for()
    images = "() => document.querySelectorAll('img').length"
    assert await page.evaluate(images) == 0  # no element made from the data
    assert await row(page, "xss").locator("td").nth(1).text_content() == XSS  # after Kind: Description
    await page.get_by_role("link", name="xss", exact=True).click()
    await page.get_by_role("heading", name="xss", level=1).wait_for()
    assert await page.locator("p.lead").text_content() == XSS
    assert await page.evaluate(images) == 0
    assert await row(page, "t").get_by_role("cell", name=XSS).text_content() == XSS
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_role("cell", name="user.created").first.wait_for()
    assert XSS in str(await page.get_by_role("table").text_content())  # the event's detail, as text
    assert await page.evaluate(images) == 0
    assert tab.dialogs == [] and tab.console == []  # (the CSP would block an inline handler too)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sign_in_shows_the_apis_refusal_and_stores_nothing(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]]
) -> None:
    await admin.gateway.directory.create_user("svc", actor="test", roles=["reader"])
    _, service_token = await admin.gateway.directory.create_token("svc", "t", actor="test")
    wrong = "gw_" + "A" * 50
    expected = {
        wrong: (await admin.call("GET", "/v1/roles?limit=1", token=wrong)).body,
        service_token: (await admin.call("GET", "/v1/roles?limit=1", token=service_token)).body,
    }
    assert expected[service_token]["error"] == "forbidden"
    tab = await open_tab()
    page = tab.page
    await page.goto(tab.url)
    for token, body in expected.items():
        await page.get_by_label("Admin token").fill(token)
        await page.get_by_role("button", name="Sign in").click()
        error = page.locator("#sign-in-error")
        await error.get_by_text(body["detail"], exact=True).wait_for()
        assert await tab.storage() == {"sessionStorage": {}, "localStorage": {}}
        assert await page.get_by_role("button", name="Sign out").is_hidden()
    assert all(token not in message for message in tab.console for token in expected)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_401_during_use_signs_out(admin: Admin, open_tab: Callable[..., Awaitable[Tab]]) -> None:
    tab = await open_tab()
    page = tab.page
    await tab.sign_in(admin.token)
    await admin.gateway.directory.delete_token("root", "adm", actor="test")
    await admin.gateway.catch_up()
    refusal = (await admin.call("GET", "/v1/roles")).body
    await page.get_by_role("link", name="Roles").click()
    await page.locator("#sign-in-error").get_by_text(f"Signed out: {refusal['detail']}").wait_for()
    await page.get_by_label("Admin token").wait_for()
    assert await page.locator("#view").inner_text() == ""  # no data left on the page
    assert await tab.storage() == {"sessionStorage": {}, "localStorage": {}}


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_lists_follow_next_to_the_end(admin: Admin, open_tab: Callable[..., Awaitable[Tab]]) -> None:
    directory = admin.gateway.directory
    names = [f"user-{number:03d}" for number in range(120)]
    for name in names:
        await directory.create_user(name, actor="test", roles=["reader"])
    for number in range(105):  # more than one page of WHOLE_PAGE (100)
        await directory.create_token("user-007", f"t{number:03d}", actor="test")
    tab = await open_tab()
    page = tab.page
    await tab.sign_in(admin.token)
    more = page.get_by_role("button", name="More")
    while True:
        await page.get_by_role("link", name="user-000").wait_for()
        if await more.is_hidden():
            break
        shown = await page.locator("tbody tr").count()
        await more.click()
        await page.locator("tbody tr").nth(shown).wait_for()  # the next page is in
    listed = await page.locator("tbody th").all_text_contents()
    assert listed == sorted([*names, "root"])
    await page.get_by_role("link", name="user-007", exact=True).click()
    await page.get_by_role("heading", name="user-007", level=1).wait_for()
    await row(page, "t104").wait_for()
    assert await page.get_by_role("table", name="Tokens").locator("tbody tr").count() == 105


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_readable_on_a_laptop_and_a_phone(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]], tmp_path: Path
) -> None:
    directory = admin.gateway.directory
    await directory.create_user("backend", actor="root", roles=["writer"], description="order sync")
    await directory.create_user(
        "spa",
        actor="root",
        roles=["reader"],
        description="the shop's web app",
        origins=["https://shop.example"],
    )
    await directory.create_user(
        "ci-job", actor="root", roles=["reader", "other"], description="nightly build"
    )
    await directory.create_token("spa", "web", actor="root", description="browser")
    await directory.create_token("spa", "preview", actor="root", expires_at=None)
    overflow = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"

    laptop = await open_tab(1280, 800)
    await laptop.sign_in(admin.token)
    await laptop.page.get_by_role("link", name="spa", exact=True).wait_for()
    assert await laptop.page.evaluate(overflow) <= 0
    await screenshot(laptop.page, tmp_path, "console-users.png")

    phone = await open_tab(390, 844)
    await phone.sign_in(admin.token)
    await phone.page.get_by_role("link", name="spa", exact=True).click()
    await row(phone.page, "web").wait_for()
    assert await phone.page.evaluate(overflow) <= 0  # no sideways scrolling
    # The controls stay reachable and their focus visible, by keyboard.
    await phone.page.keyboard.press("Tab")  # from the page's heading to its first control
    focused = await phone.page.evaluate(
        "() => [document.activeElement.textContent, getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused == ["Edit", "solid"]
    await screenshot(phone.page, tmp_path, "console-user-mobile.png")
    assert laptop.console == [] and phone.console == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_filters_edit_and_errors_from_the_api(
    admin: Admin, open_tab: Callable[..., Awaitable[Tab]]
) -> None:
    directory = admin.gateway.directory
    await directory.create_user("app-one", actor="test", roles=["reader"])
    await directory.create_user("app-two", actor="test", roles=["writer"])
    await directory.create_user("batch", actor="test", roles=["reader"])
    tab = await open_tab()
    page = tab.page
    await tab.sign_in(admin.token)
    await page.get_by_role("link", name="batch").wait_for()
    # Filter by prefix and role.
    await page.get_by_label("Prefix").fill("app-")
    await page.get_by_label("Role", exact=True).select_option("reader")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_role("link", name="batch").wait_for(state="detached")
    assert await page.locator("tbody th").all_text_contents() == ["app-one"]
    await page.get_by_label("Prefix").fill("zzz")
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_text("No service user matches this filter.").wait_for()
    # A refused create shows the API's detail and marks the field it names.
    await page.get_by_role("button", name="New service user").click()
    await page.get_by_label("Name").fill("app-one")
    await page.get_by_role("button", name="Create").click()
    conflict = await admin.call("POST", "/v1/service-users", json={"name": "app-one"})
    await page.locator(".form-error").get_by_text(conflict.body["detail"], exact=True).wait_for()
    await page.get_by_label("Name").fill("new-one")
    await page.get_by_label("Origins").fill("not an origin")
    await page.get_by_role("button", name="Create").click()
    await page.locator("[aria-invalid=true]").wait_for()
    assert await page.get_by_label("Origins").get_attribute("aria-invalid") == "true"
    assert (await admin.call("GET", "/v1/service-users/new-one")).status == 404
    # Edit: roles replaced whole, assigned by the admin.
    await page.goto(tab.url + "#/users/app-two")
    await page.get_by_role("button", name="Edit").click()
    await page.get_by_label("Roles").select_option(["other", "reader"])
    await page.get_by_role("button", name="Save").click()
    await tab.status("Service user app-two saved.")
    await row(page, "other").wait_for()
    user = (await admin.call("GET", "/v1/service-users/app-two")).body
    assert [(role["name"], role["assigned_by"]) for role in user["roles"]] == [
        ("other", "root"),
        ("reader", "root"),
    ]
    # Chromium itself logs each refused call (409, 422); the page logs nothing.
    assert all(message.startswith("error: Failed to load resource") for message in tab.console), tab.console
    assert tab.dialogs == []


async def test_the_console_works_on_a_tls_admin_listener_that_lists_other_cors_origins(
    tmp_path: Path, upstream: TestServer, browser: Any
) -> None:
    # A real `gateway serve` whose admin listener speaks TLS and has aiohttp-cors set up for
    # another origin: the console's own (same-origin) calls must pass untouched by either.
    from tests.integration.test_remote_cli import admin_token
    from tests.process import GatewayProcess
    from tests.security.test_listener_tls import (
        client_context,
        gateway_config,
        https,
        install,
        issue,
        tls_block,
        wait_ready_https,
    )

    served = tmp_path / "served"
    served.mkdir()
    config = gateway_config(served, upstream, admin=tls_block())
    config.write_text(config.read_text() + 'admin:\n  cors_origins: ["https://ops.example"]\n')
    install(served, issue())
    token = await asyncio.to_thread(admin_token, config)
    process = GatewayProcess(config)
    try:
        await wait_ready_https(process)
        context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(WAIT)
        messages: list[str] = []
        page.on("console", lambda message: messages.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: messages.append(f"pageerror: {error}"))
        tab = Tab(page, https(process.admin_port, "/console/"))
        answer = await page.goto(tab.url)
        assert answer is not None and answer.headers["content-security-policy"] == CSP
        await tab.sign_in(token)
        await page.get_by_role("button", name="New service user").click()
        await page.get_by_label("Name").fill("edge")
        await page.get_by_label("Origins").fill("https://app.example")
        await page.get_by_role("button", name="Create").click()
        await page.get_by_role("heading", name="edge", level=1).wait_for()
        await page.get_by_role("button", name="New token").click()
        await page.get_by_label("Name").fill("ci")
        await page.get_by_role("button", name="Create").click()
        secret = await read_secret(page, "gw_")
        await close_secret(page, secret)
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                https(process.admin_port, "/v1/service-users/edge/tokens"),
                headers={"Authorization": f"Bearer {token}"},
                ssl=client_context(),
            ) as listed,
        ):
            assert listed.status == 200
            assert [item["name"] for item in (await listed.json())["items"]] == ["ci"]
        assert messages == []
        await context.close()
    finally:
        process.stop()
