"""Retention: old change-feed and audit rows removed in the background, in small batches.

Imports: config (RetentionConfig), errors, models, store.

Every instance runs the loop; on PostgreSQL each batch first takes a transaction-scoped
advisory lock without waiting, so one instance at a time deletes and the others skip
that round. A batch is one short transaction of at most `batch` rows, and batches are
spaced out, so neither requests nor admin writes queue behind it.

The change feed's newest row is never removed: SQLite would hand a removed id out again
(its row ids restart after the maximum), and a gateway's cursor would skip it. The
newest id removed is recorded in `feed_horizon`, in the same transaction, so a gateway
that was away longer than `retention.changes` knows it missed changes (gateway.changefeed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update

from gateway.config import RetentionConfig
from gateway.errors import StoreUnavailable
from gateway.models import AuditEvent, Change, FeedHorizon
from gateway.store import RETENTION_LOCK, Store, translate_errors
from gateway.timeparse import utcnow

log = logging.getLogger("gateway.retention")

BATCH = 500
_PAUSE = 0.05  # seconds between two batches: other writers get the store in between
_INTERVAL = 60.0  # seconds between two rounds


class Retention:
    """Deletes rows older than the configured retention, a batch at a time."""

    def __init__(
        self,
        store: Store,
        config: Callable[[], RetentionConfig],
        *,
        batch: int = BATCH,
        on_deleted: Callable[[str, int], None] | None = None,
    ) -> None:
        self._store = store
        self._config = config  # read each round: SIGHUP may change it
        self._batch = batch
        self._on_deleted = on_deleted

    async def run(self, interval: float = _INTERVAL) -> None:
        """Prune every `interval` seconds for ever (a background task of the server)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.prune()
            except StoreUnavailable:
                log.warning("retention skipped: the store cannot be reached; trying again later")

    async def prune(self, now: datetime | None = None) -> dict[str, int]:
        """One round: delete what is older than the retention; the rows deleted per table."""
        now = utcnow() if now is None else now
        config = self._config()
        deleted = {"changes": 0, "audit_events": 0}
        for table, keep in (("changes", config.changes), ("audit_events", config.audit_events)):
            if keep is None:
                continue
            cutoff = now - timedelta(seconds=keep)
            while True:
                count = await self._batch_of(table, cutoff)
                if count is None:  # another instance holds the lock: its round, not ours
                    return deleted
                deleted[table] += count
                if count:
                    if self._on_deleted is not None:
                        self._on_deleted(table, count)
                if count < self._batch:
                    break
                await asyncio.sleep(_PAUSE)
        if any(deleted.values()):
            log.info("retention removed old rows", extra=deleted)
        return deleted

    async def _batch_of(self, table: str, cutoff: datetime) -> int | None:
        """Delete up to one batch of `table` older than `cutoff`; None when the lock is taken."""
        async with translate_errors(), self._store.write_sessions() as session, session.begin():
            if self._store.dialect == "postgresql":
                taken = await session.scalar(select(func.pg_try_advisory_xact_lock(RETENTION_LOCK)))
                if not taken:
                    return None
            if table == "audit_events":
                ids = select(AuditEvent.id).where(AuditEvent.at < cutoff).order_by(AuditEvent.id)
                chosen = list((await session.scalars(ids.limit(self._batch))).all())
                if chosen:
                    await session.execute(delete(AuditEvent).where(AuditEvent.id.in_(chosen)))
                return len(chosen)
            newest = select(func.max(Change.id)).scalar_subquery()
            ids = select(Change.id).where(Change.at < cutoff, Change.id < newest).order_by(Change.id)
            chosen = list((await session.scalars(ids.limit(self._batch))).all())
            if chosen:
                await session.execute(delete(Change).where(Change.id.in_(chosen)))
                await session.execute(
                    update(FeedHorizon)
                    .where(FeedHorizon.id == 1, FeedHorizon.below < chosen[-1])
                    .values(below=chosen[-1])
                )
            return len(chosen)
