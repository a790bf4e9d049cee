"""Logging: one JSON object per line, the `Secret` type, and redaction of aiohttp's parser errors.

Imports: stdlib and python-json-logger only.

Logger names are `gateway.<module>`. The proxy's per-request line is written by
`pipeline.py` through the `gateway.access` logger; aiohttp's own access log is off.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER: Final = "gateway.access"


class Secret:
    """A string that prints as `***` (repr and str); read it with `.reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; never log the result."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


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
    access_handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
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
