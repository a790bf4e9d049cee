"""Composition root: the one place objects are built, wired and started.

Imports: everything below it (config, policy, store, auth, changefeed, headers, proxy,
pipeline, admin, logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from aiohttp import web

from gateway.admin import AdminContext, build_admin_app
from gateway.assertion import Assertions
from gateway.auth import Authenticator, LastUsed, TokenCache
from gateway.bearer import AccessTokens, Credentials
from gateway.changefeed import ChangeFeed
from gateway.config import Config, load_config
from gateway.cors import OriginIndex
from gateway.decision import Decider, Settings, build_settings
from gateway.errors import ConfigError, Refusal, StoreUnavailable
from gateway.keyring import SIGNING_CHANGE, KeyRing, open_ring, reload_ring
from gateway.lifecycle import Lifecycle
from gateway.limiter import RateLimiter
from gateway.listener import ConnectionBudget, Guard, GuardedAppRunner, GuardedServer
from gateway.logs import flush_access_log, install_redaction
from gateway.metrics import Metrics, Snapshot
from gateway.notify import Notifications
from gateway.pipeline import Pipeline
from gateway.proxy import Forwarder
from gateway.retention import Retention
from gateway.services import Directory
from gateway.store import Change, Store, open_store
from gateway.token_endpoint import TokenEndpoint
from gateway.upstream import UpstreamClient
from gateway.websocket import Sockets, WebSocketRelay

log = logging.getLogger("gateway.app")

_LAST_USED_FLUSH_SECONDS = 15
ADMIN_MAX_CONNECTIONS = 64  # open admin-listener connections per process


def warn_unverified(config: Config) -> None:
    """Log, at every start and reload, each route that talks TLS without verifying the upstream."""
    for route in config.routes:
        if route.tls is not None and not route.tls.verify:
            log.warning(
                "upstream TLS is not verified (tls.verify: false): anyone on the path can read and "
                "change this route's traffic",
                extra={"route": route.name, "upstream": route.upstream},
            )


class Gateway:
    """Everything one gateway process runs: store, caches, change feed, pipeline."""

    def __init__(
        self, config: Config, settings: Settings, store: Store, *, metrics_dir: str | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.cache = TokenCache(
            ttl=config.cache.ttl,
            negative_ttl=config.cache.negative_ttl,
            max_entries=config.cache.max_entries,
        )
        self.last_used = LastUsed()
        self.feed = ChangeFeed(store, self.cache, outage_grace=config.cache.outage_grace)
        self.authenticator = Authenticator(
            store,
            self.cache,
            self.last_used,
            store_trusted=self.feed.trusted,
            store_timeout=self.feed.store_timeout,
        )
        self.upstreams = UpstreamClient()
        self.metrics = Metrics(metrics_dir)
        self.origins = OriginIndex()
        self.lifecycle = Lifecycle()
        self.connections = ConnectionBudget(limit=config.client.max_connections)
        # The admin listener has its own, so a flood on the proxy never locks operators out.
        self.admin_connections = ConnectionBudget(limit=ADMIN_MAX_CONNECTIONS)
        # API keys' last use (written by the token endpoint) and the signing keys (open() loads them).
        self.key_use = LastUsed()
        self.ring = KeyRing([], config.signing.token_ttl)
        self._secret = b""
        self._ring_reload: asyncio.Task[None] | None = None
        self.access = AccessTokens(
            self.authenticator, store, lambda: self.ring, lambda: self.pipeline.settings
        )
        self.credentials = Credentials(self.authenticator, self.access)
        # Counters outlive reloads: each request reads its limits from its own settings.
        self.limiter = RateLimiter(config.rate_limits, self.metrics)
        decider = Decider(self.credentials.authenticate, self.origins, self.limiter)
        forwarder = Forwarder(self.upstreams, self.lifecycle)
        # Open WebSockets are decided again when the feed brings a change, on reload and on expiry.
        self.sockets = Sockets(decider, lambda: self.pipeline.settings, self.feed.trusted, self.metrics)
        self.pipeline = Pipeline(
            settings,
            decider,
            forwarder,
            WebSocketRelay(forwarder, self.sockets),
            TokenEndpoint(
                self.authenticator, store, lambda: self.ring, self.key_use, self.metrics, self.limiter
            ),
            Assertions(lambda: self.ring),
            self.metrics,
            self.origins,
            self.lifecycle,
        )
        self.feed.subscribe(self._on_changes)
        self.feed.subscribe(self.sockets.on_changes)
        self.feed.subscribe_reset(self._read_everything_again)
        self.retention = Retention(
            store,
            lambda: self.pipeline.settings.config.retention,
            on_deleted=lambda table, count: self.metrics.retention_deleted.labels(table).inc(count),
        )
        self.directory = Directory(store, lambda: self.pipeline.settings.table)
        self._tasks: list[asyncio.Task[None]] = []
        self._origin_refresh: asyncio.Task[None] | None = None
        self._origin_refresh_again = False

    def admin_context(self) -> AdminContext:
        """The admin listener's view of this gateway."""
        return AdminContext(
            store=self.store,
            directory=self.directory,
            authenticator=self.authenticator,
            credentials=self.credentials,
            cache=self.cache,
            feed=self.feed,
            metrics=self.metrics,
            settings=lambda: self.pipeline.settings,
            origins=self.origins,
            changed=self.changed,
            lifecycle=self.lifecycle,
            jwks=lambda: self.ring.jwks(time.time()),
            refresh_metrics=self.refresh_metrics,
        )

    def refresh_metrics(self) -> None:
        """Bring the values a scrape reads from the running gateway up to date."""
        self.metrics.refresh(
            Snapshot(
                store_healthy=self.feed.healthy,
                cached_identities=len(self.cache),
                cache_hits=self.authenticator.cache_hits,
                cache_misses=self.authenticator.cache_misses,
            )
        )

    async def changed(self, user: str, *, origins: bool = True) -> None:
        """A change to `user` made in this process: applied here when this returns (others poll
        the feed). `origins=False` when the change cannot touch allowed origins (token changes)."""
        self.cache.evict_user(user)
        if origins:
            # Awaited, not scheduled: the next preflight must already see the new set.
            await self.origins.refresh(self.store)

    def admin_refusal(self, status: int, error: Refusal, request_id: str) -> None:
        """Count and log an admin-listener request that the HTTP parser refused."""
        self.metrics.refusals.labels(error.value).inc()
        log.info(
            "admin request refused", extra={"request_id": request_id, "status": status, "error": error.value}
        )

    async def catch_up(self) -> None:
        """Apply every change in the store now, instead of at the next poll."""
        await self.feed.poll()
        if self._origin_refresh is not None:
            await self._origin_refresh

    def _on_changes(self, changes: list[Change]) -> None:
        self._refresh_origins_soon()
        if any(change.user == SIGNING_CHANGE for change in changes):
            self._reload_ring_soon()

    async def _read_everything_again(self) -> None:
        """The change feed fell behind retention: whatever it missed, read it all again now."""
        await self.origins.refresh(self.store)
        await self._load_ring()
        self.sockets.on_reload()  # every open socket is decided again on the fresh state

    async def _load_ring(self) -> None:
        ttl = self.pipeline.settings.config.signing.token_ttl
        self.ring = await reload_ring(self.store, self._secret, ttl)
        self.access.forget()  # a revoked key's tokens must not stay verified

    def _reload_ring_soon(self) -> None:
        if self._ring_reload is not None and not self._ring_reload.done():
            self._ring_reload.add_done_callback(lambda _: self._reload_ring_soon())
            return
        self._ring_reload = asyncio.create_task(self._reload_ring())

    async def _reload_ring(self) -> None:
        """A signing key was rotated or revoked (here or elsewhere): read the ring again."""
        try:
            await self._load_ring()
        except (StoreUnavailable, ConfigError) as error:
            log.error("could not read the signing keys again; will retry", extra={"error": str(error)})
            await asyncio.sleep(1.0)
            self._reload_ring_soon()
            return
        self.sockets.on_reload()  # nor the sockets they opened
        log.info("signing keys reloaded", extra={"keys": [key.kid for key in self.ring.keys]})

    def _refresh_origins_soon(self) -> None:
        # Coalesce: one refresh in flight at a time, plus one more if changes arrived meanwhile.
        if self._origin_refresh is not None and not self._origin_refresh.done():
            self._origin_refresh_again = True
            return
        self._origin_refresh = asyncio.create_task(self._refresh_origins())

    async def _refresh_origins(self) -> None:
        while True:
            self._origin_refresh_again = False
            await self.origins.refresh(self.store)
            if not self._origin_refresh_again:
                return

    @classmethod
    async def open(cls, config: Config, *, metrics_dir: str | None = None) -> Gateway:
        """Validate the config, open (and migrate) the store, start background work.

        `metrics_dir`: the directory `--workers N` share their metrics in (None: one process)."""
        install_redaction()
        settings = build_settings(config)
        warn_unverified(config)
        store = await open_store(config.store_url, migrate=True)
        gateway = cls(config, settings, store, metrics_dir=metrics_dir)
        try:
            gateway.ring, gateway._secret = await open_ring(store, config, os.environ)
        except BaseException:
            await store.close()
            raise
        await gateway.feed.poll()
        await gateway.origins.refresh(store)
        gateway._tasks = [
            asyncio.create_task(gateway.feed.run(), name="change-feed"),
            asyncio.create_task(gateway._housekeeping(), name="last-used"),
            asyncio.create_task(gateway.sockets.run(), name="websocket-checks"),
            asyncio.create_task(gateway.retention.run(), name="retention"),
        ]
        if store.dialect == "postgresql":
            notifications = Notifications(store.engine, gateway.feed.wake)
            gateway._tasks.append(asyncio.create_task(notifications.run(), name="change-notifications"))
        return gateway

    async def _housekeeping(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            flush_access_log()
            if self.metrics.shared:  # worker 0's scrape reads the other workers' files
                self.refresh_metrics()
            ticks += 1
            if ticks % _LAST_USED_FLUSH_SECONDS == 0:
                await self._flush_once()

    async def _flush_once(self) -> None:
        try:
            await self.last_used.flush(self.store)
            await self.key_use.flush(self.store, keys=True)
        except StoreUnavailable:
            log.warning("could not record last_used_at (store unreachable); will retry")

    def reload(self) -> bool:
        """Re-read the config file and policies; keep the old version if the new one is bad."""
        try:
            config = load_config(self.config.path)
            settings = build_settings(config)
            warn_unverified(config)
        except ConfigError as error:
            log.error(
                "reload refused; the previous configuration stays live", extra={"problems": error.problems}
            )
            return False
        for what, old, new in (
            ("listeners.proxy", self.config.proxy_listen, config.proxy_listen),
            ("listeners.admin", self.config.admin_listen, config.admin_listen),
            ("listeners.proxy.tls", self.config.proxy_tls, config.proxy_tls),
            ("listeners.admin.tls", self.config.admin_tls, config.admin_tls),
            ("store.url", self.config.store_url, config.store_url),
        ):
            if old != new:
                log.warning("%s changed: it takes effect only after a restart", what)
        self.pipeline.settings = settings
        self.limiter.reconfigure(config.rate_limits)
        self.access.forget()  # verified with the old issuer, audience and roles graph
        self.sockets.on_reload()
        # A request still on the old version reopens its pool; it closes on the next reload.
        self.upstreams.retain({(r.name, r.upstream, r.max_connections, r.tls) for r in config.routes})
        log.info("configuration reloaded", extra={"routes": len(config.routes)})
        return True

    async def close(self) -> None:
        """Stop background work, flush last use, close upstream connections and the store."""
        if self._origin_refresh is not None:
            self._tasks.append(self._origin_refresh)
        if self._ring_reload is not None:
            self._tasks.append(self._ring_reload)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.sockets.stop()
        await self.authenticator.close()
        await self._flush_once()
        flush_access_log()
        await self.upstreams.close()
        await self.limiter.close()
        await self.store.close()


# The parser's limits for request lines and header fields (aiohttp's defaults, stated), and
# no decoding of request bodies: the upstream must get exactly the bytes whose length the
# client announced (an inflated body smuggled its tail as a second request; README "Request framing").
PROXY_HANDLER_ARGS: dict[str, Any] = {"max_field_size": 8190, "max_line_size": 8190, "auto_decompress": False}


def build_proxy_server(gateway: Gateway, **kwargs: Any) -> web.Server:
    """The proxy listener: aiohttp's low-level server straight into the pipeline.

    No Application and router: the route table is ours, and aiohttp's automatic
    "100 Continue" must not run (the pipeline sends it only after authorisation).
    """
    guard = Guard(
        gateway.connections,
        gateway.config.client.header_timeout,
        gateway.pipeline.record_listener_refusal,
        gateway.lifecycle,
    )
    return GuardedServer(gateway.pipeline.handle, guard=guard, **PROXY_HANDLER_ARGS, **kwargs)


def build_admin_runner(gateway: Gateway, **kwargs: Any) -> web.AppRunner:
    """The admin listener's runner: its own connection budget, the head timer, JSON parser refusals."""
    guard = Guard(
        gateway.admin_connections,
        gateway.config.client.header_timeout,
        gateway.admin_refusal,
        gateway.lifecycle,
    )
    app = build_admin_app(gateway.admin_context())
    return GuardedAppRunner(app, guard=guard, **PROXY_HANDLER_ARGS, **kwargs)
