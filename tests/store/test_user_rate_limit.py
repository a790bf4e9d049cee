"""A service user's own rate limit in the store: migration 0003, the service layer, the lookups.

Real stores only (a SQLite file and PostgreSQL). The enforcement is tested with the limiter;
here: what is stored, what a token or API-key lookup carries, and that a change is fed to
the other gateways (change row) and audited.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import insert, inspect, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import tokens
from gateway.errors import Invalid
from gateway.models import ApiKey, RoleAssignment, ServiceUser, Token
from gateway.ratelimit import Limit, make_limit, parse_spec
from gateway.services import UNSET, Directory
from gateway.store import Store, _alembic_config, create_engine, migrate, open_store
from tests.store.conftest import ACTOR, role_table

LIMIT = Limit(rate=100.0, per=1.0, burst=200)
THEN = datetime(2026, 6, 1, tzinfo=UTC)


# -- migration 0003 --------------------------------------------------------------------


async def _to_revision(engine: AsyncEngine, revision: str, *, down: bool = False) -> None:
    """Run the shipped migrations up (or down) to `revision`, in one transaction as `migrate` does."""

    def run(connection: Connection) -> None:
        config = _alembic_config(connection)
        (command.downgrade if down else command.upgrade)(config, revision)

    async with engine.connect() as connection, connection.begin():
        await connection.run_sync(run)


async def _columns(engine: AsyncEngine, table: str) -> set[str]:
    async with engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: {column["name"] for column in inspect(sync).get_columns(table)}
        )


async def _seed_at_0002(engine: AsyncEngine) -> tuple[str, str]:
    """A user with a role, a token and an API key, written as a 0002 gateway would: (token, key) secrets.

    Core inserts name only the columns given, so none of them mentions `rate_limit`.
    """
    token, key = tokens.generate(), tokens.generate(tokens.KEY_PREFIX)
    async with engine.begin() as connection:
        user_id = (
            await connection.execute(
                insert(ServiceUser)
                .values(name="old", kind="service", disabled=False, created_at=THEN, created_by="0002")
                .returning(ServiceUser.id)
            )
        ).scalar_one()
        await connection.execute(
            insert(RoleAssignment).values(
                user_id=user_id, role="reader", assigned_by="0002", assigned_at=THEN
            )
        )
        await connection.execute(
            insert(Token).values(
                id="tok_old",
                user_id=user_id,
                name="ci",
                digest=tokens.digest(token),
                created_at=THEN,
                created_by="0002",
            )
        )
        await connection.execute(
            insert(ApiKey).values(
                id=tokens.new_key_id(),
                user_id=user_id,
                digest=tokens.digest(key),
                created_at=THEN,
                created_by="0002",
            )
        )
    return token, key


async def test_upgrade_from_0002_keeps_users_on_the_default(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        await _to_revision(engine, "0002")
        assert "rate_limit" not in await _columns(engine, "service_users")
        token, key = await _seed_at_0002(engine)
        await migrate(engine)
        assert "rate_limit" in await _columns(engine, "service_users")
        store = Store(engine)
        principal = await store.lookup_token(tokens.digest(token))
        assert principal is not None and principal.user == "old" and principal.user_roles == ("reader",)
        assert principal.rate_limit is None
        by_key = await store.lookup_key(tokens.digest(key))
        assert by_key is not None and by_key.rate_limit is None
        directory = Directory(store, lambda: role_table({"reader"}))
        view = await directory.get_user("old")
        assert view.rate_limit is None and view.to_json()["rate_limit"] is None
        # And the migrated user takes an override like a new one.
        await directory.update_user("old", actor=ACTOR, rate_limit=LIMIT)
        principal = await store.lookup_token(tokens.digest(token))
        assert principal is not None and principal.rate_limit == LIMIT
    finally:
        await engine.dispose()


async def test_downgrade_drops_the_column_and_nothing_else(store_url: str) -> None:
    """0003 → 0002 must not rebuild service_users: on SQLite that would cascade to every token."""
    store = await open_store(store_url)
    try:
        directory = Directory(store, lambda: role_table({"reader"}))
        await directory.create_user("svc", actor=ACTOR, roles=["reader"], rate_limit=LIMIT)
        await directory.create_token("svc", "ci", actor=ACTOR)
        await _to_revision(store.engine, "0002", down=True)
        assert "rate_limit" not in await _columns(store.engine, "service_users")
        async with store.engine.connect() as connection:
            counts = [
                (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()  # noqa: S608
                for table in ("service_users", "role_assignments", "tokens")
            ]
        assert counts == [1, 1, 1]
        await migrate(store.engine)
        assert (await directory.get_user("svc")).rate_limit is None  # the override went with the column
    finally:
        await store.close()


# -- the service layer -----------------------------------------------------------------


async def test_create_with_and_without_a_rate_limit(store: Store, directory: Directory) -> None:
    view = await directory.create_user("svc", actor=ACTOR, rate_limit=make_limit(100, "1s", 200))
    assert view.rate_limit == LIMIT
    assert view.to_json()["rate_limit"] == {"rate": 100, "per": "1s", "burst": 200}
    assert await directory.get_user("svc") == view
    plain = await directory.create_user("plain", actor=ACTOR)
    assert plain.rate_limit is None and plain.to_json()["rate_limit"] is None
    listed = {user.name: user.rate_limit for user in await directory.list_users()}
    assert listed == {"plain": None, "svc": LIMIT}
    async with store.sessions() as session:
        stored = {
            name: limit
            for name, limit in await session.execute(select(ServiceUser.name, ServiceUser.rate_limit))
        }
    assert stored == {"svc": "100/1s:200", "plain": None}  # format_spec text, NULL = the default
    events = await directory.list_audit()
    assert [e.detail["rate_limit"] for e in events if e.action == "user.created"] == [None, "100/1s:200"]


async def test_the_json_shows_the_period_as_written_shortest(directory: Directory) -> None:
    view = await directory.create_user("svc", actor=ACTOR, rate_limit=make_limit(10, "60s"))
    assert view.to_json()["rate_limit"] == {"rate": 10, "per": "1m", "burst": 10}  # burst: the rate


async def test_update_sets_keeps_and_resets_with_change_rows_and_audit(
    store: Store, directory: Directory
) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"])
    cursor = await store.latest_change()

    view = await directory.update_user("svc", actor=ACTOR, rate_limit=LIMIT)
    assert view.rate_limit == LIMIT
    [change] = await store.changes_since(cursor)
    assert (change.user, change.token_id) == ("svc", None)  # every identity of the user is evicted
    [event] = await directory.list_audit(limit=1)
    assert (event.action, event.target, event.detail) == (
        "user.updated",
        "user/svc",
        {"rate_limit": "100/1s:200"},
    )

    # Not given (UNSET, the default): another field changes, the limit stays.
    view = await directory.update_user("svc", actor=ACTOR, description="x", rate_limit=UNSET)
    assert view.rate_limit == LIMIT and (await directory.get_user("svc")).rate_limit == LIMIT
    assert "rate_limit" not in (await directory.list_audit(limit=1))[0].detail

    # The same limit again is no change: no event, no change row.
    cursor = await store.latest_change()
    events = len(await directory.list_audit())
    await directory.update_user("svc", actor=ACTOR, rate_limit=parse_spec("100/1s:200"))
    assert await store.changes_since(cursor) == [] and len(await directory.list_audit()) == events

    # None: back to rate_limits.per_user.
    view = await directory.update_user("svc", actor=ACTOR, rate_limit=None)
    assert view.rate_limit is None and (await directory.get_user("svc")).rate_limit is None
    assert [c.user for c in await store.changes_since(cursor)] == ["svc"]
    assert (await directory.list_audit(limit=1))[0].detail == {"rate_limit": None}
    # Resetting what is already the default changes nothing either.
    cursor = await store.latest_change()
    await directory.update_user("svc", actor=ACTOR, rate_limit=None)
    assert await store.changes_since(cursor) == []


async def test_every_limit_is_stored_exactly_or_refused(directory: Directory) -> None:
    """The stored text reads back as the same limit; a period it would round is refused, not changed."""
    await directory.create_user("svc", actor=ACTOR)
    with pytest.raises(Invalid) as caught:
        await directory.update_user("svc", actor=ACTOR, rate_limit=make_limit(10, "1.000000000001s"))
    assert caught.value.field == "rate_limit.per"
    with pytest.raises(Invalid):
        await directory.create_user("other", actor=ACTOR, rate_limit=make_limit(10, "1.000000000001s"))
    assert (await directory.get_user("svc")).rate_limit is None
    assert [user.name for user in await directory.list_users()] == ["svc"]
    # The largest values make_limit accepts, and a period with decimals, are kept exactly.
    for limit in (make_limit(1_000_000_000, "24h", 1_000_000_000), make_limit(10, "1.2345678s")):
        await directory.update_user("svc", actor=ACTOR, rate_limit=limit)
        assert (await directory.get_user("svc")).rate_limit == limit


# -- the lookups -----------------------------------------------------------------------


async def test_token_and_api_key_lookups_carry_the_users_limit(store: Store, directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"], rate_limit=LIMIT)
    await directory.create_user("plain", actor=ACTOR, roles=["reader"])
    _, token = await directory.create_token("svc", "ci", actor=ACTOR)
    key, key_secret = await directory.create_key("svc", actor=ACTOR)
    _, plain_token = await directory.create_token("plain", "ci", actor=ACTOR)

    by_token = await store.lookup_token(tokens.digest(token))
    by_key = await store.lookup_key(tokens.digest(key_secret))
    by_key_id = await store.key_principal(key.id)
    plain = await store.lookup_token(tokens.digest(plain_token))
    assert by_token is not None and by_token.rate_limit == LIMIT
    assert by_key is not None and by_key.rate_limit == LIMIT and by_key.token_id == key.id
    assert by_key_id is not None and by_key_id.rate_limit == LIMIT
    assert plain is not None and plain.rate_limit is None

    await directory.update_user("svc", actor=ACTOR, rate_limit=parse_spec("5/1m"))
    again = await store.lookup_token(tokens.digest(token))
    assert again is not None and again.rate_limit == Limit(rate=5.0, per=60.0, burst=5)
    await directory.update_user("svc", actor=ACTOR, rate_limit=None)
    reset = await store.lookup_key(tokens.digest(key_secret))
    assert reset is not None and reset.rate_limit is None


async def test_an_unreadable_stored_limit_is_the_default_and_a_warning(
    store: Store, directory: Directory, caplog: pytest.LogCaptureFixture
) -> None:
    """Written by hand (or another version): requests go on under the default, never a 500."""
    await directory.create_user("svc", actor=ACTOR, roles=["reader"])
    _, token = await directory.create_token("svc", "ci", actor=ACTOR)
    async with store.engine.begin() as connection:
        await connection.execute(update(ServiceUser).values(rate_limit="lots/1s"))
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        principal = await store.lookup_token(tokens.digest(token))
        view = await directory.get_user("svc")
    assert principal is not None and principal.rate_limit is None and principal.user == "svc"
    assert view.rate_limit is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings and all("'svc'" in message and "default" in message for message in warnings)
    assert not any(token in message or tokens.digest(token) in message for message in warnings)
