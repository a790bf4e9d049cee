"""The store's read path, change feed, last-use batches and origin index, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text

from gateway import tokens
from gateway.services import Directory
from gateway.store import Change, Principal, Store
from tests.conftest import PG_ADMIN_DSN
from tests.store.conftest import ACTOR, role_table

FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


async def test_lookup_token_returns_the_principal(store: Store, directory: Directory) -> None:
    await directory.create_user(
        "svc", actor=ACTOR, roles=["writer", "reader"], origins=["https://b.example", "https://a.example"]
    )
    view, secret = await directory.create_token("svc", "ci", actor=ACTOR, expires_at=FUTURE)
    principal = await store.lookup_token(tokens.digest(secret))
    assert principal == Principal(
        user="svc",
        kind="service",
        disabled=False,
        token_id=view.id,
        token_name="ci",
        expires_at=FUTURE,
        user_roles=("reader", "writer"),
        token_roles=None,
        origins=frozenset({"https://a.example", "https://b.example"}),
    )
    assert secret not in repr(principal)


async def test_lookup_token_user_and_token_roles(store: Store, directory: Directory) -> None:
    """The lookup returns the user's roles and the token's own list; the proxy combines them."""
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "writer"])
    _, follow = await directory.create_token("svc", "follow", actor=ACTOR)
    _, fixed = await directory.create_token("svc", "fixed", actor=ACTOR, roles=["reader"])

    async def roles(secret: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        principal = await store.lookup_token(tokens.digest(secret))
        assert principal is not None
        return principal.user_roles, principal.token_roles

    assert await roles(follow) == (("reader", "writer"), None)
    assert await roles(fixed) == (("reader", "writer"), ("reader",))
    await directory.update_user("svc", actor=ACTOR, add_roles=["other"])
    assert await roles(follow) == (("other", "reader", "writer"), None)
    assert await roles(fixed) == (("other", "reader", "writer"), ("reader",))
    await directory.update_user("svc", actor=ACTOR, remove_roles=["reader"])
    # Still reached through writer's includes: the token's list keeps it.
    assert await roles(follow) == (("other", "writer"), None)
    assert await roles(fixed) == (("other", "writer"), ("reader",))
    await directory.update_user("svc", actor=ACTOR, remove_roles=["writer"])
    assert await roles(fixed) == (("other",), ())
    await directory.update_user("svc", actor=ACTOR, add_roles=["reader"])
    assert await roles(fixed) == (("other", "reader"), ())


async def test_lookup_token_state_flags(store: Store, directory: Directory) -> None:
    await directory.create_user("root", actor=ACTOR, admin=True)
    _, secret = await directory.create_token("root", "t", actor=ACTOR)
    principal = await store.lookup_token(tokens.digest(secret))
    assert principal is not None and principal.kind == "admin" and principal.user_roles == ()
    assert principal.token_roles is None
    await directory.update_user("root", actor=ACTOR, disabled=True)
    principal = await store.lookup_token(tokens.digest(secret))
    assert principal is not None and principal.disabled
    view = await directory.expire_token("root", "t", actor=ACTOR)
    principal = await store.lookup_token(tokens.digest(secret))
    assert principal is not None and principal.expires_at == view.expires_at


async def test_lookup_token_none_for_unknown_reset_deleted(store: Store, directory: Directory) -> None:
    assert await store.lookup_token(tokens.digest(tokens.generate())) is None
    await directory.create_user("svc", actor=ACTOR)
    view, old = await directory.create_token("svc", "t", actor=ACTOR)
    _, new = await directory.reset_token("svc", "t", actor=ACTOR)
    assert await store.lookup_token(tokens.digest(old)) is None
    principal = await store.lookup_token(tokens.digest(new))
    assert principal is not None and principal.token_id == view.id
    await directory.delete_token("svc", "t", actor=ACTOR)
    assert await store.lookup_token(tokens.digest(new)) is None
    _, again = await directory.create_token("svc", "t2", actor=ACTOR)
    await directory.delete_user("svc", actor=ACTOR)
    assert await store.lookup_token(tokens.digest(again)) is None


async def test_every_mutation_writes_change_rows(store: Store, directory: Directory) -> None:
    assert await store.latest_change() == 0
    assert await store.changes_since(0) == []
    await directory.create_user("svc", actor=ACTOR, roles=["reader"])
    view, _ = await directory.create_token("svc", "t", actor=ACTOR)
    await directory.update_user("svc", actor=ACTOR, add_roles=["writer"])
    await directory.update_user("svc", actor=ACTOR, add_origins=["https://a.example"])
    await directory.update_user("svc", actor=ACTOR, disabled=True)
    await directory.reset_token("svc", "t", actor=ACTOR)
    await directory.expire_token("svc", "t", actor=ACTOR)
    await directory.delete_token("svc", "t", actor=ACTOR)
    await directory.delete_user("svc", actor=ACTOR)
    changes = await store.changes_since(0)
    assert [(c.user, c.token_id) for c in changes] == [
        ("svc", None),
        ("svc", view.id),
        ("svc", None),
        ("svc", None),
        ("svc", None),
        ("svc", view.id),
        ("svc", view.id),
        ("svc", view.id),
        ("svc", None),
    ]
    ids = [c.id for c in changes]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert await store.latest_change() == ids[-1]
    assert await store.changes_since(ids[3], limit=2) == changes[4:6]
    assert await store.changes_since(ids[-1]) == []
    assert isinstance(changes[0], Change)


async def test_failed_mutation_writes_no_change(store: Store, directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    latest = await store.latest_change()
    with pytest.raises(Exception):  # noqa: B017  (any refusal: Conflict here)
        await directory.create_user("svc", actor=ACTOR)
    with pytest.raises(Exception):  # noqa: B017
        await directory.update_user("svc", actor=ACTOR, add_roles=["ghost"])
    assert await store.latest_change() == latest


async def test_record_last_used_is_batched_monotonic_and_not_a_change(
    store: Store, directory: Directory
) -> None:
    await directory.create_user("svc", actor=ACTOR)
    a, _ = await directory.create_token("svc", "a", actor=ACTOR)
    b, _ = await directory.create_token("svc", "b", actor=ACTOR)
    latest = await store.latest_change()
    t1 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    await store.record_last_used({a.id: t1, b.id: t1 + timedelta(hours=1), "tok_unknown": t1})
    await store.record_last_used({})
    used = {t.name: t.last_used_at for t in await directory.list_tokens("svc")}
    assert used == {"a": t1, "b": t1 + timedelta(hours=1)}
    # An older report (another worker flushing late) never moves the time backwards.
    await store.record_last_used({a.id: t1 - timedelta(days=1), b.id: t1 + timedelta(hours=2)})
    used = {t.name: t.last_used_at for t in await directory.list_tokens("svc")}
    assert used == {"a": t1, "b": t1 + timedelta(hours=2)}
    assert await store.latest_change() == latest
    [token_a, _] = await directory.list_tokens("svc")
    assert token_a.to_json()["last_used_at"] == "2030-01-01T12:00:00Z"


async def test_active_origins(store: Store, directory: Directory) -> None:
    assert await store.active_origins() == {}
    await directory.create_user("a", actor=ACTOR, origins=["https://one.example", "https://two.example"])
    await directory.create_user("b", actor=ACTOR, origins=["https://two.example"])
    await directory.create_user("c", actor=ACTOR, origins=["https://three.example"])
    await directory.update_user("c", actor=ACTOR, disabled=True)
    assert await store.active_origins() == {
        "https://one.example": frozenset({"a"}),
        "https://two.example": frozenset({"a", "b"}),
    }


async def test_ping(store: Store) -> None:
    await store.ping()
    assert store.dialect in ("sqlite", "postgresql")


async def test_sqlite_writes_begin_immediate(tmp_path: Path) -> None:
    """Writers take SQLite's write lock up front, so a read-then-write never fails mid-way."""
    from gateway.store import open_store

    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}")
    seen: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("BEGIN"):
            seen.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        directory = Directory(store, lambda: role_table({"service-user-project-admin"}))
        await directory.create_user("svc", actor=ACTOR)
        await directory.list_users()
        await store.record_last_used({"tok_x": datetime.now(UTC)})
        assert seen == ["BEGIN IMMEDIATE", "BEGIN", "BEGIN IMMEDIATE"]
    finally:
        await store.close()


async def _store_text(store: Store) -> bytes:
    """Everything the store holds, as bytes: the SQLite files, or every PostgreSQL table as text."""
    database = store.engine.url.database or ""
    if store.dialect == "sqlite":
        path = Path(database)
        await store.close()  # checkpoint the WAL; read the main file and anything left beside it
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + database
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        dump = []
        for row in tables:
            name = row["tablename"]
            dump.append(name)
            for record in await connection.fetch(f'SELECT t::text FROM "{name}" AS t'):  # noqa: S608
                dump.append(record[0])
        return "\n".join(dump).encode()
    finally:
        await connection.close()


async def test_the_store_never_holds_a_token_secret(store: Store, directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, description="holds secrets?")
    view, first = await directory.create_token("svc", "t", actor=ACTOR, description="d")
    _, second = await directory.reset_token("svc", "t", actor=ACTOR)
    _, third = await directory.create_token("svc", "u", actor=ACTOR)
    await directory.expire_token("svc", "u", actor=ACTOR)
    await store.record_last_used({view.id: datetime.now(UTC)})
    async with store.engine.connect() as connection:
        stored = (await connection.execute(text("SELECT digest FROM tokens ORDER BY name"))).scalars().all()
    assert stored == [tokens.digest(second), tokens.digest(third)]
    content = await _store_text(store)
    assert b"holds secrets?" in content and tokens.digest(second).encode() in content  # the dump works
    for secret in (first, second, third):
        assert secret.encode() not in content
        assert secret[3:46].encode() not in content  # the random body alone
