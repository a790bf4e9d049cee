"""Explain: why a request would be allowed or refused (README "Explain a refusal").

Imports: decision, auth, cors, errors, paths, policy, services, store, timeparse.

The trace is built from the same `Decision` the proxy acts on, after the fact, so explain
can never disagree with the proxy and the proxy pays nothing for it. Explain never
forwards, never updates `last_used_at` and never shows the credential.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import Authenticator, LastUsed, TokenCache, check_state
from gateway.cors import OriginIndex
from gateway.decision import HTTP_METHODS, Decider, Decision, Settings, printable
from gateway.errors import Invalid
from gateway.paths import ORIGIN_FORM, split_target
from gateway.policy import RoutePolicy, Rule
from gateway.services import Directory
from gateway.services.views import UserView
from gateway.store import Principal, Store
from gateway.timeparse import format_time

STEPS = ("method", "route", "path", "rule", "credential", "permission", "origin")
_ORDER = {name: index for index, name in enumerate(STEPS)}


@dataclass(frozen=True, slots=True)
class Target:
    """What to explain: method, raw path and query of the request, its Origin header."""

    method: str
    raw_path: str
    query: str
    origin: str | None


def parse_target(method: str, url: str, origin: str | None) -> Target:
    """Check explain's input: `url` is a path ("/orders/1?x") or an http(s) URL (Invalid, 422)."""
    if method not in HTTP_METHODS:
        raise Invalid("method", "must be an HTTP method such as GET (upper-case)")
    target = url
    if not url.startswith("/"):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Invalid("url", "must be a path starting with '/' or an http(s):// URL")
        # The raw text after the authority, undecoded: explain sees the bytes the proxy would.
        # The authority ends at the first '/', '?' or '#' (so "http://h?next=/x" is "/?next=/x").
        after = url[len(parts.scheme) + 3 :].split("#", 1)[0]
        end = len(parts.netloc)
        target = after[end:]
        if not target.startswith("/"):
            target = "/" + target
    if ORIGIN_FORM.fullmatch(target) is None:
        raise Invalid("url", "must not contain spaces or control characters")
    if origin is not None and (not origin or len(origin) > 2048):
        raise Invalid("origin", "must be an origin such as https://app.example.com")
    raw_path, query = split_target(target)
    return Target(method, raw_path, query, origin)


def user_principal(view: UserView) -> Principal:
    """The identity explain assumes for `--user NAME`: the user's roles, no token."""
    return Principal(
        user=view.name,
        kind=view.kind,
        disabled=view.disabled,
        token_id="",
        token_name="",
        expires_at=None,
        user_roles=tuple(sorted({role.name for role in view.roles})),
        token_roles=None,
        origins=frozenset(view.allowed_origins),
        rate_limit=view.rate_limit,
    )


def as_user(principal: Principal) -> Callable[[list[str]], Awaitable[Principal]]:
    """A credential step that always finds `principal` (disabled users are still refused)."""

    async def authenticate(authorization: list[str]) -> Principal:
        check_state(principal, time.time())
        return principal

    return authenticate


@dataclass(frozen=True, slots=True)
class Trace:
    """Explain's answer: the decision and every step, as data (`to_json`) or as text (`render`)."""

    data: dict[str, Any]

    @property
    def allowed(self) -> bool:
        """Whether the request would be allowed."""
        return bool(self.data["decision"]["allowed"])

    def to_json(self) -> dict[str, Any]:
        """The trace as the admin API and `--format json` give it."""
        return self.data

    def render(self) -> str:
        """A short, readable trace for people."""
        return render(self.data)


async def explain(
    settings: Settings, decider: Decider, target: Target, *, credential: str, token: str | None
) -> Trace:
    """Decide `target` as the proxy would and explain it; `credential` says whose it is, for people.

    `token` is the bearer secret to check (None when `decider` assumes a user); it never
    appears in the trace.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if target.origin is not None:
        headers["Origin"] = target.origin
    decision = await decider.decide(settings, target.method, target.raw_path, CIMultiDictProxy(headers))
    return Trace(trace(decision, settings, target, credential))


class CredentialCheck(Protocol):
    """What explain needs of a credential check: the proxy's chain (gateway.bearer) or tokens alone."""

    def authenticate(self, authorization: list[str], *, touch: bool = True) -> Awaitable[Principal]: ...


async def explain_request(
    settings: Settings,
    directory: Directory,
    authenticator: CredentialCheck,
    origins: OriginIndex,
    target: Target,
    *,
    token: str | None,
    user: str | None,
) -> Trace:
    """Explain `target` for a bearer `token` or for a `user` (exactly one; NotFound for an unknown user)."""
    if user is not None:
        view = await directory.get_user(user)
        decider = Decider(as_user(user_principal(view)), origins)
        return await explain(settings, decider, target, credential=f"as user '{user}'", token=None)

    async def authenticate(authorization: list[str]) -> Principal:
        return await authenticator.authenticate(authorization, touch=False)

    decider = Decider(authenticate, origins)
    return await explain(settings, decider, target, credential="with the given token", token=token)


async def explain_from_store(
    settings: Settings, store: Store, target: Target, *, token: str | None, user: str | None
) -> Trace:
    """Explain without a running gateway: read identities and origins from `store` (the CLI)."""
    origins = OriginIndex()
    await origins.refresh(store)
    cache = TokenCache(ttl=1.0, negative_ttl=0.0, max_entries=1)
    authenticator = Authenticator(store, cache, LastUsed(), store_trusted=lambda: True)
    directory = Directory(store, lambda: settings.table)
    return await explain_request(settings, directory, authenticator, origins, target, token=token, user=user)


def trace(decision: Decision, settings: Settings, target: Target, credential: str) -> dict[str, Any]:
    """The trace of `decision` (made for `target`) as JSON-ready data."""
    error = decision.error
    refused_at = decision.stage if error is not None else None
    steps: list[dict[str, Any]] = []
    for name in STEPS:
        if refused_at is not None and _ORDER[name] > _ORDER.get(refused_at, len(STEPS)):
            steps.append({"step": name, "result": "not_reached", "detail": "an earlier step refused"})
            continue
        step = _STEP_BUILDERS[name](decision, settings, target)
        if name == refused_at and error is not None:
            step["result"] = "refused"
            step["detail"] = error.message
        steps.append(step)
    route = decision.route
    identity = decision.identity() if error is None else None
    names = settings.config.identity
    outcome: dict[str, Any] = {
        "allowed": error is None,
        "status": error.status if error is not None else None,
        "error": error.refusal.value if error is not None else None,
        "detail": error.message if error is not None else None,
        "upstream": _upstream_url(route, decision, target) if error is None else None,
        "identity_headers": (
            {
                names.user_header: identity[0],
                names.roles_header: identity[1],
                names.token_id_header: identity[2] or None,  # null as a user: no token, no header
            }
            if identity is not None
            else None
        ),
    }
    return {
        "request": {
            "method": target.method,
            "path": printable(target.raw_path),
            "query": target.query or None,
            "origin": target.origin,
            "credential": credential,
        },
        "steps": steps,
        "decision": outcome,
    }


def _upstream_url(route: RoutePolicy | None, decision: Decision, target: Target) -> str | None:
    if route is None:
        return None
    query = f"?{target.query}" if target.query else ""
    return route.config.upstream.rstrip("/") + decision.upstream_path() + query


def _method_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    return {
        "step": "method",
        "result": "ok",
        "detail": f"{target.method} may be forwarded",
        "method": target.method,
    }


def _route_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    route = decision.route
    if route is None:
        return {
            "step": "route",
            "result": "ok",
            "detail": "",
            "route": None,
            "prefix": None,
            "upstream": None,
        }
    config = route.config
    return {
        "step": "route",
        "result": "ok",
        "detail": f"route '{config.name}': longest prefix {config.prefix} → {config.upstream}",
        "route": config.name,
        "prefix": config.prefix,
        "upstream": config.upstream,
    }


def _path_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    canonical = decision.canonical or None
    upstream = decision.upstream_path() if canonical is not None else None
    detail = (
        f"canonical path {printable(canonical)}; the upstream receives {printable(upstream)}"
        if canonical and upstream
        else ""
    )
    return {
        "step": "path",
        "result": "ok",
        "detail": detail,
        "raw": printable(target.raw_path),
        "canonical": printable(canonical) if canonical else None,
        "upstream_path": printable(upstream) if upstream else None,
    }


def _rule_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    route = decision.route
    base = settings.config.path.parent
    rules: list[dict[str, Any]] = []
    matched: int | None = None
    if route is not None:
        for index, rule in enumerate(route.rules, start=1):
            if matched is not None:
                rules.append(_rule_json(index, rule, None, f"not tried: rule {matched} decided", base))
            elif rule is decision.rule:
                matched = index
                rules.append(_rule_json(index, rule, True, "matches", base))
            else:
                why = _why_not(rule, target.method, decision.canonical)
                rules.append(_rule_json(index, rule, False, why, base))
    chosen = decision.rule
    if chosen is None:
        detail = (
            f"no rule of route '{route.config.name}' matches {target.method} "
            f"{printable(decision.canonical)}: refused once the credential is checked"
            if route is not None
            else ""
        )
    elif chosen.public:
        detail = f"rule {matched} ({_source(chosen, base)}) matches: public, no credential needed"
    else:
        detail = f"rule {matched} ({_source(chosen, base)}) matches: requires '{chosen.require}'"
    return {"step": "rule", "result": "ok", "detail": detail, "matched": matched, "rules": rules}


def _source(rule: Rule, base: Path) -> str:
    """`rule.source` ("file:line", named from the loading process's directory) relative to the
    config file's folder, so the CLI and the admin API name a rule the same way wherever they run."""
    file, _, line = rule.source.rpartition(":")
    absolute = Path(os.path.abspath(file))
    try:
        return f"{absolute.relative_to(base)}:{line}"
    except ValueError:
        return f"{absolute}:{line}"


def _rule_json(index: int, rule: Rule, matched: bool | None, reason: str, base: Path) -> dict[str, Any]:
    return {
        "index": index,
        "source": _source(rule, base),
        "methods": sorted(rule.methods) if rule.methods is not None else None,
        "paths": list(rule.paths),
        "require": rule.require,
        "public": rule.public,
        "matched": matched,
        "reason": reason,
    }


def _why_not(rule: Rule, method: str, path: str) -> str:
    if rule.methods is not None and method not in rule.methods:
        return f"method {method} is not one of {', '.join(sorted(rule.methods))}"
    return f"no path glob matches {printable(path)}"


def _credential_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    rule = decision.rule
    if rule is not None and rule.public:
        return {
            "step": "credential",
            "result": "skipped",
            "detail": "public rule: no credential needed; identity headers are removed, never set",
            "principal": None,
        }
    principal = decision.principal
    if principal is None:
        return {"step": "credential", "result": "ok", "detail": "", "principal": None}
    expires = format_time(principal.expires_at) if principal.expires_at is not None else None
    token = (
        f"token '{principal.token_name}' ({principal.token_id})"
        if principal.token_id
        else "no token (--user)"
    )
    return {
        "step": "credential",
        "result": "ok",
        "detail": f"{principal.kind} user '{principal.user}', {token}"
        + (f", expires {expires}" if expires else ""),
        "principal": {
            "user": principal.user,
            "kind": principal.kind,
            "disabled": principal.disabled,
            "token": principal.token_name or None,
            "token_id": principal.token_id or None,
            "expires_at": expires,
        },
    }


def _permission_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    rule = decision.rule
    if rule is not None and rule.public:
        return {"step": "permission", "result": "skipped", "detail": "public rule", "required": None}
    principal = decision.principal
    table = settings.table
    required = rule.require if rule is not None else None
    if principal is None:
        return {"step": "permission", "result": "ok", "detail": "", "required": required}
    roles = decision.roles
    granting = [role for role in roles if required is not None and table.allows((role,), required)]
    detail = f"'{required}' is granted by {', '.join(granting)}" if granting else ""
    return {
        "step": "permission",
        "result": "ok",
        "detail": detail,
        "required": required,
        "roles": {
            "user": list(principal.user_roles),
            "token": list(principal.token_roles) if principal.token_roles is not None else None,
            "carried": list(roles),
        },
        "permissions": {role: sorted(table.granted((role,))) for role in roles},
        "granted_by": granting,
    }


def _origin_step(decision: Decision, settings: Settings, target: Target) -> dict[str, Any]:
    base: dict[str, Any] = {"step": "origin", "origin": target.origin, "cors": decision.cors is not None}
    if decision.route is not None and decision.cors is None:
        return {
            **base,
            "result": "skipped",
            "detail": "the route has no cors block: Origin is the upstream's business",
        }
    if target.origin is None:
        return {**base, "result": "skipped", "detail": "no Origin header"}
    principal = decision.principal
    whose = f"user '{principal.user}'" if principal is not None else "this route (public rule)"
    return {**base, "result": "ok", "detail": f"{decision.origin} is allowed for {whose}"}


_STEP_BUILDERS: dict[str, Callable[[Decision, Settings, Target], dict[str, Any]]] = {
    "method": _method_step,
    "route": _route_step,
    "path": _path_step,
    "rule": _rule_step,
    "credential": _credential_step,
    "permission": _permission_step,
    "origin": _origin_step,
}


def render(data: dict[str, Any]) -> str:
    """The human form of a trace: one line per step, the rules under theirs, the decision last."""
    request = data["request"]
    query = f"?{request['query']}" if request["query"] else ""
    origin = f", Origin {request['origin']}" if request["origin"] else ""
    lines = [f"{request['method']} {request['path']}{query}  ({request['credential']}{origin})"]
    for step in data["steps"]:
        lines.append(f"  {step['step']:<11} {step['result']:<12} {step['detail']}".rstrip())
        if step["step"] == "rule" and step["result"] != "not_reached":
            for rule in step["rules"]:
                methods = ",".join(rule["methods"]) if rule["methods"] else "any method"
                wants = "public" if rule["public"] else f"requires {rule['require']}"
                globs = " ".join(rule["paths"])
                lines.append(
                    f"      {rule['index']}. {rule['source']}  {methods} {globs}  ({wants}): {rule['reason']}"
                )
        if (
            step["step"] == "permission"
            and step.get("permissions") is not None
            and step["result"] != "not_reached"
        ):
            carried = step["roles"]["carried"]
            lines.append(f"      roles carried: {', '.join(carried) if carried else '(none)'}")
            for role, permissions in step["permissions"].items():
                lines.append(f"        {role} → {', '.join(permissions) if permissions else '(nothing)'}")
    decision = data["decision"]
    if decision["allowed"]:
        lines.append(f"allowed: forwarded to {decision['upstream']}")
        for name, value in (decision["identity_headers"] or {}).items():
            lines.append(f"  {name}: {value}" if value is not None else f"  {name}: (not sent: no token)")
    else:
        lines.append(f"refused: {decision['status']} {decision['error']}: {decision['detail']}")
    return "\n".join(lines)
