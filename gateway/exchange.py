"""The token endpoint's request, read as RFC 6749 says (client credentials, section 4.4).

Imports: errors only. Pure: the bytes of one request in, the client's credentials out, or
an `OAuthError` whose body is the RFC's (`error`, `error_description`). The endpoint
(gateway.token_endpoint) checks the credentials against the store and mints the JWT.

Exactly one client authentication: HTTP Basic, whose user and password are the key id and
secret each form-urlencoded first (RFC 6749 section 2.3.1), or the `client_id` and
`client_secret` form fields. Any query string, a repeated parameter, both methods, or a
half of one is `invalid_request`: a lenient parser here is how one credential gets read
where another was meant.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_plus

from gateway.errors import OAuthError

MAX_BODY = 8 * 1024  # bytes; a client-credentials request is a few hundred
_FORM = "application/x-www-form-urlencoded"
_MAX_FIELDS = 16


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Who asks for a token, and for which roles (None: every role the key carries)."""

    key_id: str
    secret: str = field(repr=False)
    scope: tuple[str, ...] | None


def parse_token_request(
    *, query: str, content_type: str | None, authorization: list[str], body: bytes
) -> ClientCredentials:
    """The client credentials of a token request, or OAuthError naming what is wrong."""
    if query:
        raise OAuthError("invalid_request", "the token endpoint takes no query string: send a form body")
    if len(authorization) > 1:
        raise OAuthError("invalid_request", "more than one Authorization header")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != _FORM:
        raise OAuthError("invalid_request", f"the body must be {_FORM}")
    if len(body) > MAX_BODY:
        raise OAuthError("invalid_request", "the body is larger than 8 KiB")
    form = _form(body)
    grant = form.get("grant_type")
    if grant is None:
        raise OAuthError("invalid_request", "grant_type is missing")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    basic = _basic(authorization[0]) if authorization else None
    in_form = "client_id" in form or "client_secret" in form
    if basic is not None and in_form:
        raise OAuthError("invalid_request", "send the key either as HTTP Basic or as form fields, not both")
    if basic is not None:
        key_id, secret = basic
    elif in_form:
        if "client_id" not in form or "client_secret" not in form:
            raise OAuthError("invalid_request", "client_id and client_secret go together")
        key_id, secret = form["client_id"], form["client_secret"]
    else:
        raise OAuthError("invalid_client", "no client authentication: send the key id and secret", status=401)
    return ClientCredentials(key_id=key_id, secret=secret, scope=_scope(form.get("scope")))


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=_MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"the parameter {_shown(name)} is repeated")
        form[name] = value
    return form


def _basic(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "authenticate with HTTP Basic or form fields", status=401)
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the Basic credentials are not valid base64 of UTF-8") from None
    user, colon, password = decoded.partition(":")
    if not colon or not user or not password:
        raise OAuthError("invalid_request", "the Basic credentials must be KEY_ID:SECRET")
    return unquote_plus(user), unquote_plus(password)


def _scope(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    roles = tuple(dict.fromkeys(value.split()))
    if not roles:
        raise OAuthError("invalid_scope", "scope is empty: leave it out for every role of the key")
    return roles


def _shown(name: str) -> str:
    return repr(name[:40]) if name.isprintable() else "(unprintable)"
