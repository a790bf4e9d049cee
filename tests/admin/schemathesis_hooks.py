"""Schemathesis hooks for the contract test: the fuzzer must not lock out the admin it runs as."""

from __future__ import annotations

import os
from typing import Any

import schemathesis

ADMIN = os.environ.get("GATEWAY_TEST_ADMIN", "root")
STAND_IN = ADMIN + "-stand-in"


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """Aim cases at a stand-in name instead of the admin (disabling it would turn every later call into 401)."""
    if case.path_parameters and case.path_parameters.get("name") == ADMIN:
        case.path_parameters["name"] = STAND_IN
