"""Running the gateway as processes: one, or a parent supervising N pre-forked workers.

Imports: app, admin, config, errors, logs.

With `--workers N` the parent validates the configuration and migrates the store
once, binds one proxy socket per worker with SO_REUSEPORT (the kernel spreads new
connections evenly over them by address hash; a single shared socket let one worker
take most of a burst of connections), then forks the workers. The parent keeps every
socket open, so connections queued on a dead worker's socket wait for its restart
instead of being refused. Each worker has its own
identity cache and polls the change feed, so revocation behaves the same in all of
them. The parent forwards SIGHUP only after it validated the new version itself (a
bad version is refused once, and every worker keeps the old one), forwards SIGTERM and
SIGINT, and restarts a worker that died. Only worker 0 serves the admin listener, so
`/metrics` describes one process and admin changes apply there at once (within
250 ms in the other workers, through the change feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import signal
import socket
import ssl
import time
from types import FrameType

from aiohttp import web
from sqlalchemy.engine import make_url

from gateway.app import ADMIN_MAX_CONNECTIONS, Gateway, build_admin_runner, build_proxy_server
from gateway.config import Address, Config, load_config
from gateway.decision import build_settings
from gateway.errors import ConfigError, StoreUnavailable
from gateway.listener_tls import reload_pair, server_context
from gateway.logs import configure as configure_logging
from gateway.store import open_store

log = logging.getLogger("gateway.server")


def bind(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on `address` (IPv4 or IPv6), ready to share with workers."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError([f"listeners: cannot listen on {host}:{port}: {exc.strerror}"]) from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def run_worker(
    config: Config, proxy: socket.socket, admin: socket.socket | None, index: int = 0
) -> None:
    """Serve on the given sockets until SIGINT/SIGTERM; SIGHUP reloads routes and policies."""
    gateway = await Gateway.open(config)
    # Each worker builds its own TLS contexts: every worker serves TLS, and SIGHUP reloads them.
    contexts = [
        (name, server_context(tls), tls)
        for name, tls in (("proxy", config.proxy_tls), ("admin", config.admin_tls))
        if tls is not None and (name == "proxy" or admin is not None)
    ]
    by_name = {name: context for name, context, _ in contexts}
    # Everything built so far lives for the whole process: keep it out of every GC pass.
    gc.collect()
    gc.freeze()
    sites: list[tuple[web.BaseRunner, socket.socket, ssl.SSLContext | None]] = [
        (
            web.ServerRunner(
                build_proxy_server(gateway, access_log=None, keepalive_timeout=config.keepalive_timeout),
                shutdown_timeout=10,
            ),
            proxy,
            by_name.get("proxy"),
        )
    ]
    if admin is not None:
        admin_runner = build_admin_runner(
            gateway, access_log=None, keepalive_timeout=config.keepalive_timeout, shutdown_timeout=10
        )
        sites.append((admin_runner, admin, by_name.get("admin")))
    runners: list[web.BaseRunner] = []

    def reload() -> None:
        gateway.reload()
        for name, context, tls in contexts:
            reload_pair(context, tls, f"listeners.{name}")

    try:
        for runner, sock, context in sites:
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, sock, ssl_context=context).start()
        log.info(
            "gateway serving",
            extra={
                "worker": index,
                "proxy": _address(proxy),
                "tls": sorted(by_name),
                "admin": _address(admin) if admin is not None else None,
                "store": gateway.store.url,
                "routes": len(config.routes),
            },
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down", extra={"worker": index})
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await gateway.close()


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(config: Config, workers: int = 1) -> None:
    """Run the gateway in the foreground (blocking); the entry point of `gateway serve`."""
    configure_logging(config.log_level)
    for warning in config.warnings:
        log.warning(warning)
    if workers < 1:
        raise ConfigError(["--workers must be at least 1"])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    config = _fit_file_limit(config)
    proxies = _bind_proxies(config.proxy_listen, workers)
    admin = bind(config.admin_listen)
    try:
        if workers == 1:
            asyncio.run(run_worker(config, proxies[0], admin))
        else:
            asyncio.run(_prepare_store(config))
            Supervisor(config, proxies, admin).run()
    except StoreUnavailable as error:
        shown = make_url(config.store_url).render_as_string(hide_password=True)
        raise ConfigError([f"store: {error.message} ({shown})"]) from error
    finally:
        for sock in proxies:
            sock.close()
        admin.close()


# File descriptors kept free of client connections: the store, logs, listening sockets.
_RESERVED_FDS = 64


def _fit_file_limit(config: Config) -> Config:
    """Raise the open-file limit to its hard maximum and fit `limits.max_connections` under it.

    Each proxied connection may need a second descriptor for its upstream. A process that
    runs out of descriptors cannot accept on either listener and, on some event loops, says
    nothing; a cap below the limit keeps the admin listener reachable and is logged.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    fits = max(16, (soft - _RESERVED_FDS - ADMIN_MAX_CONNECTIONS) // 2)
    if config.client.max_connections <= fits:
        return config
    log.warning(
        "limits.max_connections lowered to fit the open-file limit",
        extra={"configured": config.client.max_connections, "effective": fits, "open_file_limit": soft},
    )
    return dataclasses.replace(config, client=dataclasses.replace(config.client, max_connections=fits))


def _bind_proxies(address: Address, workers: int) -> list[socket.socket]:
    """One proxy socket, or one SO_REUSEPORT socket per worker on the same port."""
    if workers == 1:
        return [bind(address)]
    first = bind(address, reuse_port=True)
    socks = [first]
    try:
        port = first.getsockname()[1]  # the real port when the configuration asked for 0
        for _ in range(workers - 1):
            socks.append(bind((address[0], port), reuse_port=True))
    except ConfigError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def _prepare_store(config: Config) -> None:
    # Migrate once in the parent, so N workers do not queue on the migration lock.
    store = await open_store(config.store_url, migrate=True)
    await store.close()


class Supervisor:
    """The parent of N workers: forks, forwards signals, restarts the dead."""

    def __init__(self, config: Config, proxies: list[socket.socket], admin: socket.socket) -> None:
        self._config = config
        self._count = len(proxies)
        self._proxies = proxies
        self._admin = admin
        self._children: dict[int, int] = {}  # pid -> worker index
        self._stopping = False

    def run(self) -> None:
        """Fork the workers and supervise them until SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        for index in range(self._count):
            self._spawn(index)
        log.info("supervising workers", extra={"workers": self._count, "pid": os.getpid()})
        while self._children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in self._children:
                continue
            index = self._children.pop(pid)
            if self._stopping:
                continue
            log.error(
                "worker died; restarting it",
                extra={"worker": index, "pid": pid, "exit_status": os.waitstatus_to_exitcode(status)},
            )
            time.sleep(1.0)
            if not self._stopping:
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self._children[pid] = index
            return
        code = 0
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            asyncio.run(
                run_worker(self._config, self._proxies[index], self._admin if index == 0 else None, index)
            )
        except BaseException:  # a worker must never return into the parent's loop
            log.exception("worker failed", extra={"worker": index})
            code = 1
        finally:
            os._exit(code)

    def _signal_children(self, sig: signal.Signals) -> None:
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._signal_children(signal.SIGTERM)

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        try:
            build_settings(load_config(self._config.path))
        except ConfigError as error:
            log.error(
                "reload refused; the previous configuration stays live", extra={"problems": error.problems}
            )
            return
        self._signal_children(signal.SIGHUP)
