"""`/.gateway/authz`: decisions for a proxy in front (nginx, Traefik, Caddy, Envoy); README "Forward-auth".

Imports: decision, errors, paths.

The request to decide comes from exactly one source: the `X-Original-Method` +
`X-Original-URI` pair (nginx `auth_request`), the `X-Forwarded-Method` + `X-Forwarded-Uri`
pair (Traefik ForwardAuth, Caddy `forward_auth`), or the path after `/.gateway/authz` with
the request's own method (Envoy ext_authz HTTP). Traefik and Caddy copy the client's
headers into the auth request, so anything ambiguous (both pairs, half a pair, a repeated
header, a pair and a path) is refused: a client must never choose which request is
authorised. So is any spelling of an identity header, or a bearer entry in
`Sec-WebSocket-Protocol`: the answer's identity is the only one that may reach the upstream.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from gateway.decision import HTTP_METHODS, Decider, Decision, Settings, printable
from gateway.errors import BadRequest, GatewayError, Refusal, RouteNotFound, refusal
from gateway.paths import ORIGIN_FORM, split_target

_NGINX = ("X-Original-Method", "X-Original-URI")
_FORWARDED = ("X-Forwarded-Method", "X-Forwarded-Uri")
# nginx's auth_request passes 401 and 403 on and turns every other status into 500.
_NGINX_PASSES = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class Answer:
    """The endpoint's response with what the access log needs."""

    response: web.Response
    decision: Decision | None  # None when the request was refused before deciding
    error: Refusal | None
    method: str | None  # the decided request's method and path, when known
    path: str


@dataclass(frozen=True, slots=True)
class _Subject:
    method: str
    raw_path: str
    nginx: bool  # the X-Original-* pair was used: refusals must be 401 or 403


class ForwardAuth:
    """Answers requests to `/.gateway/*` on the proxy listener."""

    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    async def answer(
        self, request: web.BaseRequest, settings: Settings, raw_path: str, request_id: str
    ) -> Answer:
        """Decide the request described by `request` (never forwards; never raises a GatewayError)."""
        headers = request.headers
        nginx = False  # answer as nginx needs it: only once the asker is known to be a peer
        subject: _Subject | None = None
        decision: Decision | None = None
        try:
            parts = raw_path.split("/", 3)  # "", ".gateway", endpoint, rest
            endpoint = unquote(parts[2]) if len(parts) > 2 else ""
            if endpoint != "authz" or not _is_peer(request.remote, settings):
                raise RouteNotFound(f"no route for path {printable(raw_path)}")
            # Any X-Original-* header, even in an ambiguous request: nginx would make a 400 a 500.
            nginx = "X-Original-Method" in headers or "X-Original-URI" in headers
            subject = _subject(request, parts[3] if len(parts) > 3 else None)
            _refuse_identity(request, settings)
            decision = await self._decider.decide(
                settings, subject.method, subject.raw_path, headers, count=True, peer=request.remote
            )
            if decision.error is not None:
                raise decision.error
        except GatewayError as error:
            response = refusal(error, request_id)
            if nginx and response.status not in _NGINX_PASSES:
                response.headers["X-Gateway-Status"] = str(response.status)
                response.set_status(403)
            response.headers["Cache-Control"] = "no-store"
            return Answer(
                response,
                decision,
                error.refusal,
                subject.method if subject else None,
                subject.raw_path if subject else raw_path,
            )
        identity_headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
        identity_headers.update(decision.rate_headers)
        identity = decision.identity()
        if identity is not None:
            names = settings.config.identity
            user, roles, token_id = identity
            identity_headers[names.user_header] = user
            identity_headers[names.roles_header] = roles
            identity_headers[names.token_id_header] = token_id
        return Answer(
            web.Response(status=200, headers=identity_headers),
            decision,
            None,
            subject.method,
            subject.raw_path,
        )


def _is_peer(peer: str | None, settings: Settings) -> bool:
    networks = settings.config.forward_auth_peers
    if peer is None or not networks:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _subject(request: web.BaseRequest, rest: str | None) -> _Subject:
    """The method and raw path to decide, from exactly one source."""
    headers = request.headers
    found: dict[str, str] = {}
    for name in (*_NGINX, *_FORWARDED):
        values = headers.getall(name, [])
        if len(values) > 1:
            raise BadRequest(f"{name} is repeated; send it once")
        if values:
            found[name] = values[0]
    nginx = [name for name in _NGINX if name in found]
    forwarded = [name for name in _FORWARDED if name in found]
    if nginx and forwarded:
        raise BadRequest("both X-Original-* and X-Forwarded-Method/-Uri were sent; send exactly one pair")
    pair = nginx or forwarded
    if pair:
        names = _NGINX if nginx else _FORWARDED
        if len(pair) == 1:
            missing = names[1] if pair[0] == names[0] else names[0]
            raise BadRequest(f"{pair[0]} was sent without {missing}; send both")
        if rest is not None:
            raise BadRequest(
                f"{names[0]}/{names[1]} and a path after /.gateway/authz were both sent; send one"
            )
        method, uri = found[names[0]].strip(), found[names[1]].strip()
        if method not in HTTP_METHODS:
            raise BadRequest(f"{names[0]} is not an HTTP method the gateway accepts (they are upper-case)")
        if ORIGIN_FORM.fullmatch(uri) is None:
            raise BadRequest(f"{names[1]} must be a path starting with '/' (origin-form, no spaces)")
        raw_path, _ = split_target(uri)
        return _Subject(method, raw_path, bool(nginx))
    if rest is None:
        raise BadRequest(
            "no request to decide: send X-Original-Method and X-Original-URI, X-Forwarded-Method "
            "and X-Forwarded-Uri, or the path after /.gateway/authz"
        )
    return _Subject(request.method, "/" + rest, False)


def _refuse_identity(request: web.BaseRequest, settings: Settings) -> None:
    """400 for any spelling of an identity header or a bearer subprotocol in the decision request."""
    policy = settings.headers
    for name in request.headers:
        if policy.is_identity(name):
            raise BadRequest(f"the request carries an identity header ({printable(name)}); none may be sent")
    for line in request.headers.getall("Sec-WebSocket-Protocol", []):
        for entry in line.split(","):
            if entry.strip()[:7].lower() == "bearer.":
                raise BadRequest("a bearer entry in Sec-WebSocket-Protocol is not accepted here")
