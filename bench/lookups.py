"""Cold token lookups at scale: fill a store with N tokens, then time `Store.lookup_token`.

The fill uses SQLAlchemy core `insert()` executemany on the gateway's own tables, in
batches; a token's digest is `gateway.tokens.digest(secret)`, as
`gateway/services/tokens.py` stores it. The secrets are derived from a per-run seed so
a sample of existing digests can be recomputed without keeping a million in memory.
Lookups go straight to the store (no identity cache): each one is the store's real
read path: one statement, token ⋈ user by the digest index with the user's roles and origins
aggregated in correlated subqueries.
"""

from __future__ import annotations

import random
import secrets
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, insert, select, text

from bench.procs import core_ticks
from gateway import tokens
from gateway.models import AllowedOrigin, RoleAssignment, ServiceUser, Token
from gateway.store import Store, open_store


def _table(model: type[Any]) -> Table:
    return cast(Table, model.__table__)


def secret_for(seed: str, index: int) -> str:
    """The bench's secret of token number `index` (any string hashes like a real secret)."""
    return f"gw_bench_{seed}_{index}"


@dataclass
class FillResult:
    tokens: int
    users: int
    seconds: float
    rows_per_s: float


@dataclass
class LookupResult:
    store: str
    tokens: int
    fill: FillResult
    known: int
    unknown: int
    known_p50_ms: float
    known_p99_ms: float
    known_mean_ms: float
    unknown_p50_ms: float
    unknown_p99_ms: float
    unknown_mean_ms: float
    all_p99_ms: float
    machine_busy: float
    """CPU use of the whole machine (both cores, every process) while the lookups were timed."""
    own_cpu: float
    """CPU seconds of this process per wall second while the lookups were timed."""


async def fill(store: Store, count: int, seed: str, *, users: int = 1000, batch: int = 20_000) -> FillResult:
    """Insert `users` service users (two roles each, an origin for one in ten) and `count` tokens."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    async with store.engine.begin() as connection:
        await connection.execute(
            insert(_table(ServiceUser)),
            [
                {
                    "name": f"lk-u{u:05d}",
                    "kind": "service",
                    "description": None,
                    "disabled": False,
                    "created_at": now,
                    "created_by": "bench",
                }
                for u in range(users)
            ],
        )
        ids = [
            row[0]
            for row in (
                await connection.execute(
                    select(ServiceUser.id).where(ServiceUser.name.like("lk-u%")).order_by(ServiceUser.name)
                )
            ).all()
        ]
        await connection.execute(
            insert(_table(RoleAssignment)),
            [
                {"user_id": uid, "role": role, "assigned_by": "bench", "assigned_at": now}
                for uid in ids
                for role in ("bench-reader", "service-user-project-admin")
            ],
        )
        await connection.execute(
            insert(_table(AllowedOrigin)),
            [
                {"user_id": uid, "origin": f"https://app{n}.example"}
                for n, uid in enumerate(ids)
                if n % 10 == 0
            ],
        )
    statement = insert(_table(Token))
    for start in range(0, count, batch):
        rows = [
            {
                "id": f"tok_bench{i:011d}",
                "user_id": ids[i % len(ids)],
                "name": f"t{i}",
                "digest": tokens.digest(secret_for(seed, i)),
                "created_at": now,
                "created_by": "bench",
            }
            for i in range(start, min(count, start + batch))
        ]
        async with store.engine.begin() as connection:
            await connection.execute(statement, rows)
    async with store.engine.connect() as connection:
        await connection.execute(text("ANALYZE"))
        await connection.commit()
    seconds = time.perf_counter() - started
    return FillResult(tokens=count, users=users, seconds=seconds, rows_per_s=count / seconds)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def measure(
    url: str,
    label: str,
    count: int,
    *,
    known: int = 2000,
    unknown: int = 500,
    seed: str | None = None,
    before_timing: Callable[[], object] | None = None,
) -> LookupResult:
    """Open (and migrate) the store at `url`, fill it, then time lookups of known and unknown digests."""
    seed = seed or secrets.token_hex(4)
    store = await open_store(url, migrate=True)
    try:
        filled = await fill(store, count, seed)
        rng = random.Random(seed)
        sample = rng.sample(range(count), known + 10)
        warmup, sample = sample[:10], sample[10:]
        for i in warmup:  # open the pooled connection; not timed
            await store.lookup_token(tokens.digest(secret_for(seed, i)))
        work = [(True, tokens.digest(secret_for(seed, i))) for i in sample]
        work += [(False, tokens.digest(tokens.generate())) for _ in range(unknown)]
        rng.shuffle(work)
        if before_timing is not None:
            before_timing()
        times: dict[bool, list[float]] = {True: [], False: []}
        machine_before, own_before, wall_before = core_ticks(), time.process_time(), time.monotonic()
        for exists, digest in work:
            started = time.perf_counter_ns()
            principal = await store.lookup_token(digest)
            elapsed_ms = (time.perf_counter_ns() - started) / 1e6
            if (principal is not None) != exists:
                raise RuntimeError(f"lookup_token: expected {'a principal' if exists else 'None'}")
            expected = ("bench-reader", "service-user-project-admin")
            if principal is not None and principal.user_roles != expected:
                raise RuntimeError(f"lookup_token: unexpected roles {principal.user_roles}")
            times[exists].append(elapsed_ms)
        machine_after, own_after, wall = core_ticks(), time.process_time(), time.monotonic() - wall_before
    finally:
        await store.close()
    both = times[True] + times[False]
    return LookupResult(
        store=label,
        tokens=count,
        fill=filled,
        known=len(times[True]),
        unknown=len(times[False]),
        known_p50_ms=_percentile(times[True], 50),
        known_p99_ms=_percentile(times[True], 99),
        known_mean_ms=statistics.fmean(times[True]),
        unknown_p50_ms=_percentile(times[False], 50),
        unknown_p99_ms=_percentile(times[False], 99),
        unknown_mean_ms=statistics.fmean(times[False]),
        all_p99_ms=_percentile(both, 99),
        machine_busy=(machine_after[0] - machine_before[0]) / max(1, machine_after[1] - machine_before[1]),
        own_cpu=(own_after - own_before) / wall,
    )
