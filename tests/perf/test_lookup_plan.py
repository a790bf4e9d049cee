"""The hot path's SQL, on both real stores: none on a cache hit, an index on a cold lookup.

The bench (`bench/run.sh`) times these paths; these tests pin down why they are fast,
so that a change which silently adds a query per request or loses the digest index
fails CI instead of only a benchmark nobody reran.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, event, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import tokens
from gateway.models import ServiceUser, Token
from gateway.store import Store
from tests.conftest import Harness

FILL_ROWS = 20_000
FILL_USERS = 200


@contextmanager
def captured(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) the engine sends to the driver inside the block."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


def _tables(statement: str) -> set[str]:
    return set(re.findall(r"\b(tokens|service_users|role_assignments|allowed_origins|changes)\b", statement))


def _background(statement: str) -> bool:
    """The gateway's own background work, which runs whatever the requests do."""
    if _tables(statement) == {"changes"}:
        return True  # the change feed's poll
    if re.match(r"\s*UPDATE (tokens|api_keys) SET last_used_at", statement):
        return True  # the periodic last-used flush (a write, never a lookup)
    if re.match(r"\s*SELECT allowed_origins\.origin, service_users\.name", statement):
        return True  # the CORS origin index, refreshed after changes
    return statement.strip().upper() in {"BEGIN", "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK", "SELECT 1", ";"}


async def test_cache_hit_issues_no_token_or_user_query(harness: Harness) -> None:
    token = await harness.token()
    await harness.settle()  # apply the change-feed entries of creating it, or they would evict it
    headers = {"Authorization": f"Bearer {token}"}
    first = await harness.client.get("/echo/a", headers=headers)
    assert first.status == 200
    authenticator = harness.gateway.authenticator
    hits, misses = authenticator.cache_hits, authenticator.cache_misses

    with captured(harness.gateway.store.engine) as statements:
        for _ in range(20):
            response = await harness.client.get("/echo/a", headers=headers)
            assert response.status == 200
            await response.read()

    assert (authenticator.cache_hits - hits, authenticator.cache_misses - misses) == (20, 0)
    lookups = [s for s, _ in statements if _tables(s) & {"tokens", "service_users"} and not _background(s)]
    assert lookups == [], f"cached requests queried the store: {lookups}"
    others = [s for s, _ in statements if not _background(s)]
    assert others == [], f"cached requests ran SQL: {others}"


async def _fill(store: Store) -> None:
    """FILL_USERS users and FILL_ROWS tokens spread over them, bulk-inserted; then ANALYZE."""
    now = datetime.now(UTC)
    users = [
        {"name": f"plan-u{u}", "kind": "service", "disabled": False, "created_at": now, "created_by": "test"}
        for u in range(FILL_USERS)
    ]
    async with store.engine.begin() as connection:
        await connection.execute(insert(cast(Table, ServiceUser.__table__)), users)
        ids = (
            (await connection.execute(select(ServiceUser.id).where(ServiceUser.name.like("plan-u%"))))
            .scalars()
            .all()
        )
        rows = [
            {
                "id": f"tok_plan{i:012d}",
                "user_id": ids[i % len(ids)],
                "name": f"plan-{i}",
                "digest": tokens.digest(f"plan-secret-{i}"),
                "created_at": now,
                "created_by": "test",
            }
            for i in range(FILL_ROWS)
        ]
        await connection.execute(insert(cast(Table, Token.__table__)), rows)
    async with store.engine.connect() as connection:
        await connection.execute(text("ANALYZE"))
        await connection.commit()


async def _lookup_statements(store: Store, digest: str) -> list[tuple[str, Any]]:
    """The statements `Store.lookup_token` runs for `digest` (which must exist)."""
    with captured(store.engine) as statements:
        assert await store.lookup_token(digest) is not None
    return [(s, p) for s, p in statements if s.lstrip().upper().startswith(("SELECT", "WITH", "("))]


async def test_cold_lookup_uses_the_digest_index(harness: Harness) -> None:
    store = harness.gateway.store
    secret = await harness.token("planner")
    await _fill(store)
    # The gateway's own background reads (the change feed, the CORS origin index it refreshes
    # after the changes above) run on the same engine: let them settle, then keep them out.
    await harness.gateway.catch_up()

    captured_selects = await _lookup_statements(store, tokens.digest(secret))
    selects = [(s, p) for s, p in captured_selects if not _background(s)]
    by_digest = [(s, p) for s, p in selects if "tokens" in _tables(s) and "digest" in s]
    assert len(by_digest) == 1, selects
    statement, parameters = by_digest[0]
    follow_ups = [(s, p) for s, p in selects if "tokens" not in _tables(s)]

    async with store.engine.connect() as connection:
        if store.dialect == "sqlite":
            indexes = set()
            for row in (await connection.exec_driver_sql("PRAGMA index_list(tokens)")).all():
                columns = (await connection.exec_driver_sql(f'PRAGMA index_info("{row[1]}")')).all()
                if [column[2] for column in columns] == ["digest"]:
                    indexes.add(row[1])
            assert indexes, "no index on tokens(digest)"
            for sql, params in [(statement, parameters), *follow_ups]:
                plan = [
                    row[3]
                    for row in (await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)).all()
                ]
                text_plan = "\n".join(plan)
                assert not re.search(
                    r"\bSCAN (TABLE )?(tokens|service_users|role_assignments|allowed_origins)\b", text_plan
                ), f"{sql}\n{text_plan}"
            plan = [
                row[3]
                for row in (
                    await connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
                ).all()
            ]
            token_steps = [step for step in plan if re.search(r"\btokens\b", step)]
            assert token_steps, plan
            assert all(re.search(r"USING (COVERING )?INDEX|PRIMARY KEY", step) for step in token_steps), plan
            assert any(f"INDEX {name} " in step for step in token_steps for name in indexes), (indexes, plan)
        else:
            digest_indexes = {
                row[0]
                for row in (
                    await connection.exec_driver_sql(
                        "SELECT indexname FROM pg_indexes WHERE tablename = 'tokens' "
                        "AND indexdef LIKE '%(digest)%'"
                    )
                ).all()
            }
            assert digest_indexes, "no index on tokens(digest)"
            rows = (await connection.exec_driver_sql("EXPLAIN " + statement, parameters)).all()
            plan_text = "\n".join(row[0] for row in rows)
            assert "Seq Scan on tokens" not in plan_text, plan_text
            assert any(
                re.search(rf"Index (Only )?Scan using {name} on tokens", plan_text) for name in digest_indexes
            ), plan_text
