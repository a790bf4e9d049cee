"""Where a process is in its life: serving, draining, or cutting what is left.

Imports: nothing of the gateway. Read on every request (a flag), written by the server's
shutdown sequence (README "Shutdown and drain").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Lifecycle:
    """Flags the shutdown sequence sets; everything that answers requests reads them."""

    # SIGTERM arrived: /readyz is 503 and every answer carries `Connection: close`.
    draining: bool = False
    # The shutdown timeout passed: a request still running is being cut (logged "shutdown").
    cutting: bool = False
