"""Token roles through the proxy: a token limited to a role its user reaches through `includes`.

DEFAULT_POLICIES (tests/conftest.py): `writer` (echo:write) includes `reader` (echo:read);
`other` grants other:read, which the `deep` route (/echo/deep) requires.
"""

from __future__ import annotations

from tests.conftest import Harness
from tests.upstream import header_values


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def carried(harness: Harness, token: str, path: str = "/echo/a") -> list[str]:
    """X-Service-User-Roles as the upstream received it on a permitted GET of `path`."""
    response = await harness.client.get(path, headers=bearer(token))
    assert response.status == 200, await response.text()
    return header_values(await response.json(), "X-Service-User-Roles")


async def status(harness: Harness, method: str, token: str, path: str = "/echo/a") -> int:
    async with harness.client.request(method, path, headers=bearer(token)) as response:
        await response.read()
        return response.status


async def test_a_writer_gets_a_reader_only_token(harness: Harness) -> None:
    reader = await harness.token("w", roles=["writer", "other"], token_roles=["reader", "other"])
    follow = await harness.token("w")
    assert await carried(harness, reader) == ["other,reader"]
    assert await status(harness, "POST", reader) == 403  # echo:write is the writer's, not the token's
    assert await carried(harness, follow) == ["other,writer"]
    assert await status(harness, "POST", follow) == 200

    # writer goes: reader is reached no more, so the token loses it (at the next request).
    await harness.directory.update_user("w", actor="test", remove_roles=["writer"])
    await harness.settle()
    assert await status(harness, "GET", reader) == 403
    assert await carried(harness, reader, "/echo/deep/x") == ["other"]
    assert await carried(harness, follow, "/echo/deep/x") == ["other"]
    # Gone for good: writer back does not give reader back to the token's list.
    await harness.directory.update_user("w", actor="test", add_roles=["writer"])
    await harness.settle()
    assert await status(harness, "GET", reader) == 403
    assert await carried(harness, reader, "/echo/deep/x") == ["other"]
    assert {t.name: t.roles for t in await harness.directory.list_tokens("w")}["t0"] == ("other",)


async def test_a_reader_token_survives_while_the_user_still_holds_reader(harness: Harness) -> None:
    reader = await harness.token("wr", roles=["writer", "reader"], token_roles=["reader"])
    assert await carried(harness, reader) == ["reader"]
    await harness.directory.update_user("wr", actor="test", remove_roles=["writer"])
    await harness.settle()
    assert await carried(harness, reader) == ["reader"]
    assert await status(harness, "POST", reader) == 403
    # The other way round: reader removed while writer (which includes it) is held again.
    await harness.directory.update_user("wr", actor="test", roles=["writer"])
    await harness.settle()
    assert await carried(harness, reader) == ["reader"]
    await harness.directory.update_user("wr", actor="test", roles=["other"])
    await harness.settle()
    assert await status(harness, "GET", reader) == 403
    assert [t.roles for t in await harness.directory.list_tokens("wr")] == [()]
