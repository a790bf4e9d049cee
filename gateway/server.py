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
bad version is refused once, and every worker keeps the old one), turns SIGTERM and
SIGINT into SIGUSR1 ("drain") for the workers, which ignore SIGTERM and SIGINT themselves
(a signal to the whole process group drains once), and restarts a worker that died.
Only worker 0 serves the admin listener, so admin changes apply there at once (within
250 ms in the other workers, through the change feed); its `/metrics` sums every worker's,
which they write to files in a directory the parent makes and removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from aiohttp import web
from sqlalchemy.engine import make_url

from gateway.app import ADMIN_MAX_CONNECTIONS, Gateway, build_admin_runner, build_proxy_server
from gateway.config import Address, Config, ShutdownConfig, load_config
from gateway.decision import build_settings
from gateway.errors import ConfigError, StoreUnavailable
from gateway.keyring import open_ring
from gateway.listener import GuardedConnection
from gateway.listener_tls import reload_pair, server_context
from gateway.logs import configure as configure_logging
from gateway.logs import flush_access_log
from gateway.metrics import share_between_workers, worker_gone
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
    config: Config,
    proxy: socket.socket,
    admin: socket.socket | None,
    index: int = 0,
    *,
    supervised: bool = False,
    metrics_dir: str | None = None,
) -> None:
    """Serve on the given sockets until SIGINT/SIGTERM (supervised: the parent's SIGUSR1), then
    drain; SIGHUP reloads routes, policies and certificates."""
    gateway = await Gateway.open(config, metrics_dir=metrics_dir)
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
                shutdown_timeout=_CUT,
            ),
            proxy,
            by_name.get("proxy"),
        )
    ]
    if admin is not None:
        admin_runner = build_admin_runner(
            gateway, access_log=None, keepalive_timeout=config.keepalive_timeout, shutdown_timeout=_CUT
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
        if supervised:
            # The parent alone reacts to SIGTERM/SIGINT (a signal to the whole process group
            # drains once) and tells its workers with SIGUSR1.
            loop.add_signal_handler(signal.SIGUSR1, stop.set)
            if _drain_asked:  # the parent asked while this worker was still starting
                stop.set()
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _second_signal_exits(stop))
        await stop.wait()
        await drain(gateway, runners, config.shutdown, index)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await gateway.close()


# Seconds aiohttp waits for a handler once drain() has decided to cut it: the cut itself.
_CUT = 0.01
_drain_asked = False  # a worker got SIGUSR1 before its event loop could take it


def _ask_drain(signum: int, frame: FrameType | None) -> None:
    global _drain_asked
    _drain_asked = True


def _second_signal_exits(stop: asyncio.Event) -> Callable[[], None]:
    def on_signal() -> None:
        if stop.is_set():
            log.error("second stop signal: exiting at once")
            flush_access_log()
            os._exit(1)
        stop.set()

    return on_signal


async def drain(
    gateway: Gateway, runners: list[web.BaseRunner], shutdown: ShutdownConfig, index: int
) -> None:
    """Stop as the drain sequence says (README "Shutdown and drain"): /readyz 503 and
    `Connection: close` for `drain_delay`, then stop accepting, close idle connections, give
    requests in flight up to `timeout`, and cut (and log) what is left."""
    lifecycle = gateway.lifecycle
    lifecycle.draining = True
    log.info(
        "draining: /readyz answers 503; the listeners close after drain_delay",
        extra={"worker": index, "drain_delay": shutdown.drain_delay, "timeout": shutdown.timeout},
    )
    await asyncio.sleep(shutdown.drain_delay)
    servers = [runner.server for runner in runners if runner.server is not None]
    gateway.sockets.close_all()  # 1001 at once: a WebSocket has no "after this answer"
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()  # no new connections; the listening socket closes
    # Not aiohttp's pre_shutdown(): it makes a connection drop the bytes still arriving, so an
    # upload in flight could never finish. Answers given while draining say `Connection: close`
    # and end their connection; one that is idle (or became idle) is closed here.
    deadline = time.monotonic() + shutdown.timeout
    while True:
        for server in servers:
            for connection in server.connections:
                if isinstance(connection, GuardedConnection):
                    connection.close_if_idle()
        if not any(server.connections for server in servers) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    left = sum(len(server.connections) for server in servers)
    if left:
        log.warning(
            "shutdown timeout reached: cutting what is still running",
            extra={"worker": index, "connections": left, "timeout": shutdown.timeout},
        )
    lifecycle.cutting = True
    await asyncio.gather(*(runner.cleanup() for runner in runners))
    runners.clear()
    log.info("stopped", extra={"worker": index})


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
    # Migrate (and make the first signing key) once in the parent, so N workers do not queue
    # on the migration lock or race for the first key.
    store = await open_store(config.store_url, migrate=True)
    try:
        await open_ring(store, config, os.environ)
    finally:
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
        self._metrics_dir = ""

    def run(self) -> None:
        """Fork the workers and supervise them until SIGTERM/SIGINT."""
        # Private to this run: files of an earlier run (other pids) would be summed in.
        self._metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        try:
            self._supervise()
        finally:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _supervise(self) -> None:
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
            worker_gone(self._metrics_dir, pid)
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
            # Ctrl-C, systemd and `tini -g` signal the whole group: only the parent acts on it.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, _ask_drain)
            # Only its own sockets: a copy of another's would keep that port open after drain_delay.
            for other, sock in enumerate(self._proxies):
                if other != index:
                    sock.close()
            if index != 0:
                self._admin.close()
            share_between_workers(self._metrics_dir)
            asyncio.run(
                run_worker(
                    self._config,
                    self._proxies[index],
                    self._admin if index == 0 else None,
                    index,
                    supervised=True,
                    metrics_dir=self._metrics_dir,
                )
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
        if self._stopping:
            log.error("second stop signal: exiting at once")
            self._signal_children(signal.SIGKILL)
            os._exit(1)
        self._stopping = True
        self._signal_children(signal.SIGUSR1)  # drain
        # The workers' copies keep serving through drain_delay; when they close theirs the
        # ports must refuse connections, not queue them on sockets only the parent holds.
        for sock in (*self._proxies, self._admin):
            sock.close()

    def _reload(self, signum: int, frame: FrameType | None) -> None:
        try:
            build_settings(load_config(self._config.path))
        except ConfigError as error:
            log.error(
                "reload refused; the previous configuration stays live", extra={"problems": error.problems}
            )
            return
        self._signal_children(signal.SIGHUP)
