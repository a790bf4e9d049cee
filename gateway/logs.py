"""Logging: one JSON object per line, the buffered request log, and redaction of aiohttp parser errors.

Imports: stdlib and python-json-logger only.

Logger names are `gateway.<module>`. The proxy's per-request line is written by
`pipeline.py` through the `gateway.access` logger; aiohttp's own access log is off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Final

from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER: Final = "gateway.access"


class ParserErrorRedactor(logging.Filter):
    """Rewrites aiohttp.server's "Error handling request" records without their exception text.

    aiohttp's HTTP parser quotes the offending request line or header in the exception
    it logs; a malformed `Authorization` line would put a token in the logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.msg = "rejected a malformed HTTP request (%s) from %s"
            record.args = (type(exc).__name__, _peer(record))
            record.exc_info = None
            record.exc_text = None
        return True


def _peer(record: logging.LogRecord) -> str:
    args = record.args
    if isinstance(args, tuple) and args:
        return str(args[0])
    return "unknown"


class AccessFormatter(logging.Formatter):
    """Formats request records whose message is already a dict of fields: one json.dumps, no more.

    The request line is written once per proxied request, so it skips the generic
    formatter's per-record attribute scan.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields = record.msg if isinstance(record.msg, dict) else {"message": record.getMessage()}
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": "request",
            **fields,
        }
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


class BufferedAccessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes request lines into a block-buffered stream, flushed at most every 0.25 s.

    stderr is line-buffered, so a plain StreamHandler costs one write syscall per request;
    here a busy gateway writes one block per quarter second. `flush_access_log()` (called
    by the server every second) and logging's shutdown flush the rest.
    """

    def __init__(self, stream: object) -> None:
        super().__init__(stream)
        self._last_flush = 0.0
        self._stamp_second = -1
        self._stamp = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.created - self._last_flush >= 0.25:
                self._last_flush = record.created
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break a request (stdlib convention)
            self.handleError(record)

    def write_fields(self, level: int, fields: dict[str, object]) -> None:
        """Write one request line without a LogRecord (the hot path's shortcut)."""
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        millis = int((now - second) * 1000)
        head = (
            f'{{"ts":"{self._stamp}.{millis:03d}+00:00","level":"{logging.getLevelName(level)}",'
            f'"logger":"{ACCESS_LOGGER}","message":"request",'
        )
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(head + _encode(fields)[1:] + "\n")
            if now - self._last_flush >= 0.25:
                self._last_flush = now
                self.stream.flush()


_access = logging.getLogger(ACCESS_LOGGER)
# json.dumps with options builds a new encoder per call; the request line reuses this one.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def write_access(level: int, fields: dict[str, object]) -> None:
    """Log one request line: straight into the buffered stream when `configure` set one up."""
    if not _access.isEnabledFor(level):
        return
    for handler in _access.handlers:
        if isinstance(handler, BufferedAccessHandler):
            handler.write_fields(level, fields)
            return
    _access.log(level, fields)  # tests and embedders: through ordinary logging


def flush_access_log() -> None:
    """Flush buffered request lines (cheap when there are none)."""
    for handler in logging.getLogger(ACCESS_LOGGER).handlers:
        handler.flush()


def configure(level: str = "info", stream: object = None) -> None:
    """Send every log record to stderr (or `stream`) as one JSON object per line."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="ts",
            json_ensure_ascii=False,
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    install_redaction()
    access = logging.getLogger(ACCESS_LOGGER)
    for old in list(access.handlers):
        access.removeHandler(old)
    if stream is None:
        # Its own block-buffered stream on the same file descriptor as stderr.
        stream = open(os.dup(sys.stderr.fileno()), "w", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
    access_handler = BufferedAccessHandler(stream)
    access_handler.setFormatter(AccessFormatter())
    access.addHandler(access_handler)
    access.propagate = False
    # aiohttp's access log quotes the request line with its query string; ours replaces it.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def install_redaction() -> None:
    """Attach the parser-error redactor to aiohttp's server logger (idempotent)."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ParserErrorRedactor) for f in server.filters):
        server.addFilter(ParserErrorRedactor())
