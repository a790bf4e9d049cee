"""The commands: serve, check, user …, token …, audit list (README "Command line").

Imports: cli.session, cli.output, services, policy and app (lazily).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import TextIO

import click

from gateway import __version__
from gateway.cli.output import (
    RateLimitType,
    TimeType,
    audit_table,
    emit_json,
    expiry,
    keys_table,
    names,
    print_secret,
    rate_limit_line,
    role_list,
    table,
    tokens_table,
    user_details,
    users_table,
    when,
)
from gateway.cli.remote import RemoteDirectory
from gateway.cli.session import Backend, Session, actor, fail
from gateway.errors import GatewayError, Invalid
from gateway.ratelimit import Limit
from gateway.services import UNSET, AuditView, KeyView, TokenView, Unset, UserView
from gateway.timeparse import format_time

DEFAULT_CONFIG = "gateway.yaml"
FORMAT = click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people; json for programs (the admin API's objects)",
)
KEY_NOTE = "Note: Save the key secret in a secure location as it will not be shown again"
TOKEN_USER = click.option("--user", "user", required=True, metavar="NAME", help="the service user")
RATE_LIMIT = click.option(
    "--rate-limit",
    type=RateLimitType(),
    metavar="RATE/PERIOD[:BURST]",
    help="the user's own rate limit, all routes together, e.g. 100/1s:200 (burst defaults to the rate); "
    "overrides rate_limits.per_user",
)

pass_session = click.make_pass_decorator(Session)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="gateway", message="%(prog)s %(version)s")
@click.option(
    "--config",
    metavar="PATH",
    help=f"config file (default: $GATEWAY_CONFIG, else ./{DEFAULT_CONFIG}); also accepted after the command",
)
@click.option(
    "--admin-url",
    metavar="URL",
    help="manage a running gateway through its admin API (env GATEWAY_ADMIN_URL; https:// unless loopback)",
)
@click.option(
    "--admin-token-file", metavar="FILE", help="a file holding the admin token (else env GATEWAY_ADMIN_TOKEN)"
)
@click.option("--admin-ca-file", metavar="FILE", help="CA certificate(s) to trust for the admin URL")
@click.pass_context
def cli(
    ctx: click.Context,
    config: str | None,
    admin_url: str | None,
    admin_token_file: str | None,
    admin_ca_file: str | None,
) -> None:
    """Service-user gateway: serve, check the config, manage service users and their tokens."""
    # main() has normally taken these out of argv already (so they may follow the command).
    if not isinstance(ctx.obj, Session):
        from pathlib import Path

        ctx.obj = Session(Path(config or DEFAULT_CONFIG))
    session: Session = ctx.obj
    if config is not None:
        from pathlib import Path

        session.config_path = Path(config)
    session.admin_url = admin_url or session.admin_url
    session.admin_token_file = admin_token_file or session.admin_token_file
    session.admin_ca_file = admin_ca_file or session.admin_ca_file


class WorkerCount(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2
    """`--workers`: a number from 1, or `auto` (one per available core)."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            number = value
        else:
            try:
                number = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is neither a number nor auto", param, ctx)
        if isinstance(number, int) and number < 1:
            self.fail(f"{number} is not at least 1", param, ctx)
        return number


@cli.command()
@click.option(
    "--workers",
    type=WorkerCount(),
    default=1,
    show_default=True,
    help="worker processes: a number, or auto for one per available core (affinity and cgroup quota)",
)
@pass_session
def serve(session: Session, workers: int | str) -> None:
    """Run the proxy and admin listeners (creates or migrates the store)."""
    config = session.config()
    from gateway.cpus import available_cpus
    from gateway.server import serve as serve_app

    try:
        serve_app(config, workers=available_cpus() if workers == "auto" else int(workers))
    except GatewayError as exc:
        fail(exc)


@cli.command()
@FORMAT
@pass_session
def check(session: Session, output: str) -> None:
    """Validate gateway.yaml and policies/: exit 0, or 1 with one file:line problem per line."""
    from gateway.policy import load_route_table

    config = session.config()
    try:
        table = load_route_table(config)
    except GatewayError as exc:
        fail(exc)
    for warning in (*config.warnings, *table.warnings):
        click.echo(f"warning: {warning}", err=True)
    if output == "json":
        emit_json(
            {
                "ok": True,
                "routes": len(config.routes),
                "roles": len(table.role_names()),
                "warnings": [*config.warnings, *table.warnings],
            }
        )
        return
    click.echo(f"ok: {len(config.routes)} routes, {len(table.role_names())} roles")


@cli.command("demo-upstream")
@click.option(
    "--listen", default="127.0.0.1:9000", show_default=True, metavar="HOST:PORT", help="where to listen"
)
def demo_upstream(listen: str) -> None:
    """Run the demo echo upstream the shipped routes point at (answers with what it received)."""
    from gateway.config import parse_listen
    from gateway.echo import run_echo

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from exc
    click.echo(f"demo upstream echoing on http://{listen}/ (Ctrl-C to stop)")
    run_echo(host, port)


# -- authz ---------------------------------------------------------------------------

REFUSED_EXIT = 3  # explain: the request would be refused (1 stays "the command failed")


@cli.group()
def authz() -> None:
    """Decisions: why a request would be allowed or refused."""


@authz.command("explain")
@click.argument("method")
@click.argument("url")
@click.option(
    "--token-file",
    type=click.File("r"),
    metavar="FILE",
    help="a file holding the bearer token ('-' reads standard input); never put a token on the command line",
)
@click.option("--user", "user_name", metavar="NAME", help="decide as this service user (its roles, no token)")
@click.option("--origin", metavar="ORIGIN", help="the Origin header a browser would send")
@FORMAT
@pass_session
def explain(
    session: Session,
    method: str,
    url: str,
    token_file: TextIO | None,
    user_name: str | None,
    origin: str | None,
    output: str,
) -> None:
    """Explain the decision on METHOD URL: route, path, every rule, credential, roles, origin.

    Exit 0 when the request would be allowed, 3 when it would be refused. Nothing is forwarded,
    last_used_at is not updated and the token is never printed.
    """
    from gateway.decision import build_settings
    from gateway.explain import explain_from_store, parse_target

    if (token_file is None) == (user_name is None):
        raise click.UsageError("give exactly one of --token-file FILE and --user NAME")
    token: str | None = None
    if token_file is not None:
        token = token_file.read().strip()
        if not token:
            raise click.BadParameter("the file holds no token", param_hint="--token-file")
    try:
        target = parse_target(method, url, origin)
    except Invalid as exc:
        hint = "--origin" if exc.field == "origin" else exc.field.upper()
        raise click.BadParameter(exc.message, param_hint=hint) from None
    if session.remote() is not None:
        trace = session.run(
            lambda api: _remote(api).explain(method, url, token=token, user=user_name, origin=origin)
        )
    else:
        try:
            settings = build_settings(session.config())
        except GatewayError as exc:
            fail(exc)
        trace = session.run_store(
            lambda store: explain_from_store(settings, store, target, token=token, user=user_name)
        )
    if output == "json":
        emit_json(trace.to_json())
    else:
        click.echo(trace.render())
    if not trace.allowed:
        sys.exit(REFUSED_EXIT)


def _remote(backend: Backend) -> RemoteDirectory:
    assert isinstance(backend, RemoteDirectory)  # Session.run gives one in remote mode
    return backend


# -- user ----------------------------------------------------------------------------


@cli.group()
def user() -> None:
    """Service users (and admin identities)."""


@user.command("create")
@click.argument("name")
@click.option("--roles", help="comma-separated roles (default: service-user-project-admin)")
@click.option("--description", help="what the user is for")
@click.option("--origins", help="comma-separated browser origins its tokens may be used from")
@click.option("--admin", is_flag=True, help="an admin identity (admin API only; holds no roles)")
@RATE_LIMIT
@FORMAT
@pass_session
def user_create(
    session: Session,
    name: str,
    roles: str | None,
    description: str | None,
    origins: str | None,
    admin: bool,
    rate_limit: Limit | None,
    output: str,
) -> None:
    """Create a service user."""
    created = session.run(
        lambda d: d.create_user(
            name,
            actor=actor(),
            roles=None if roles is None else names([roles]),
            description=description,
            origins=names([origins or ""]),
            admin=admin,
            rate_limit=rate_limit,
        )
    )
    if output == "json":
        emit_json(created.to_json())
        return
    click.echo(f"User created: {created.name}")
    if created.kind == "admin":
        click.echo("Kind: admin")
    else:
        click.echo(f"Roles assigned: {role_list(created.role_names)}")
    if created.allowed_origins:
        click.echo(f"Allowed origins: {', '.join(created.allowed_origins)}")
    if created.rate_limit is not None:
        click.echo(f"Rate limit: {rate_limit_line(created.rate_limit)}")


@user.command("list")
@click.option("--id-prefix", "prefix", metavar="P", help="only names starting with P")
@click.option("--roles", "roles", metavar="R", help="only users holding role R (comma: all of them)")
@FORMAT
@pass_session
def user_list(session: Session, prefix: str | None, roles: str | None, output: str) -> None:
    """List users, sorted by name."""
    wanted = names([roles or ""])

    async def work(directory: Backend) -> list[UserView]:
        found = await directory.list_users(prefix=prefix, role=wanted[0] if wanted else None)
        return [u for u in found if set(wanted) <= set(u.role_names)]

    users = session.run(work)
    if output == "json":
        emit_json({"items": [u.to_json() for u in users]})
    else:
        click.echo(users_table(users))


@user.command("get")
@click.argument("name")
@FORMAT
@pass_session
def user_get(session: Session, name: str, output: str) -> None:
    """Show one user."""
    found = session.run(lambda d: d.get_user(name))
    if output == "json":
        emit_json(found.to_json())
    else:
        click.echo(user_details(found))


@user.command("update")
@click.argument("name")
@click.option("--add-roles", multiple=True, metavar="R", help="roles to grant (comma-separated, repeatable)")
@click.option("--remove-roles", multiple=True, metavar="R", help="roles to revoke (also from its tokens)")
@click.option("--add-origins", multiple=True, metavar="U", help="browser origins to allow")
@click.option("--remove-origins", multiple=True, metavar="U", help="browser origins to remove")
@click.option("--description", help='new description ("" clears it)')
@click.option("--disable/--enable", "disabled", default=None, help="refuse (or accept again) its tokens")
@RATE_LIMIT
@click.option(
    "--no-rate-limit", is_flag=True, help="drop the user's own rate limit (rate_limits.per_user applies)"
)
@FORMAT
@pass_session
def user_update(
    session: Session,
    name: str,
    add_roles: tuple[str, ...],
    remove_roles: tuple[str, ...],
    add_origins: tuple[str, ...],
    remove_origins: tuple[str, ...],
    description: str | None,
    disabled: bool | None,
    rate_limit: Limit | None,
    no_rate_limit: bool,
    output: str,
) -> None:
    """Change a user's roles, origins, description, state or rate limit."""
    if rate_limit is not None and no_rate_limit:
        raise click.UsageError("give at most one of --rate-limit and --no-rate-limit")
    new_description: str | None | Unset = UNSET if description is None else (description or None)
    new_limit: Limit | None | Unset = None if no_rate_limit else (UNSET if rate_limit is None else rate_limit)
    updated = session.run(
        lambda d: d.update_user(
            name,
            actor=actor(),
            add_roles=names(add_roles),
            remove_roles=names(remove_roles),
            add_origins=names(add_origins),
            remove_origins=names(remove_origins),
            description=new_description,
            disabled=disabled,
            rate_limit=new_limit,
        )
    )
    if output == "json":
        emit_json(updated.to_json())
        return
    click.echo(f"User updated: {updated.name}")
    click.echo(user_details(updated))


@user.command("delete")
@click.argument("name")
@FORMAT
@pass_session
def user_delete(session: Session, name: str, output: str) -> None:
    """Delete a user and all its tokens."""
    session.run(lambda d: d.delete_user(name, actor=actor()))
    if output == "json":
        emit_json({"deleted": True, "name": name})
        return
    click.echo(f"User deleted: {name} (its tokens were deleted too)")


# -- token ---------------------------------------------------------------------------


@cli.group()
def token() -> None:
    """Tokens of service users (secrets are shown once)."""


@token.command("set")
@click.argument("token_name")
@TOKEN_USER
@click.option("--expires-at", type=TimeType(), help="ISO 8601 date or date-time (UTC unless a zone is given)")
@click.option("--description", help="what the token is for")
@click.option(
    "--roles",
    help="comma-separated roles the user holds or reaches via includes (default: follow the user's roles)",
)
@FORMAT
@pass_session
def token_set(
    session: Session,
    token_name: str,
    user: str,
    expires_at: datetime | None,
    description: str | None,
    roles: str | None,
    output: str,
) -> None:
    """Create a token and print its secret once."""

    async def work(directory: Backend) -> tuple[TokenView, str, tuple[str, ...]]:
        view, secret = await directory.create_token(
            user,
            token_name,
            actor=actor(),
            description=description,
            expires_at=expires_at,
            roles=None if roles is None else names([roles]),
        )
        carried = view.roles if view.roles is not None else (await directory.get_user(user)).role_names
        return view, secret, carried

    view, secret, carried = session.run(work)
    if output == "json":
        emit_json({**view.to_json(), "token": secret})  # as the admin API answers it
        return
    print_secret(secret)
    click.echo(f"Created for user: {user}")
    click.echo(f"Roles: {role_list(carried)}" + (" (follows the user's roles)" if view.roles is None else ""))
    click.echo(f"Expires at: {expiry(view.expires_at)}")


@token.command("list")
@TOKEN_USER
@FORMAT
@pass_session
def token_list(session: Session, user: str, output: str) -> None:
    """List a user's tokens (never their secrets)."""
    found = session.run(lambda d: d.list_tokens(user))
    if output == "json":
        emit_json({"items": [t.to_json() for t in found]})
    else:
        click.echo(tokens_table(found))


@token.command("reset")
@click.argument("token_name")
@TOKEN_USER
@FORMAT
@pass_session
def token_reset(session: Session, token_name: str, user: str, output: str) -> None:
    """Give a token a new secret; the old one stops working at once."""
    view, secret = session.run(lambda d: d.reset_token(user, token_name, actor=actor()))
    if output == "json":
        emit_json({**view.to_json(), "token": secret})
        return
    print_secret(secret)
    click.echo(f"Token reset: {view.name} (id {view.id}) for user: {user}")


@token.command("expire")
@click.argument("token_name")
@TOKEN_USER
@FORMAT
@pass_session
def token_expire(session: Session, token_name: str, user: str, output: str) -> None:
    """Make a token expire now; it stays listed as expired."""
    view = session.run(lambda d: d.expire_token(user, token_name, actor=actor()))
    if output == "json":
        emit_json(view.to_json())
        return
    click.echo(f"Token expired: {view.name} for user: {user} (expired on {when(view.expires_at)})")


@token.command("delete")
@click.argument("token_name")
@TOKEN_USER
@FORMAT
@pass_session
def token_delete(session: Session, token_name: str, user: str, output: str) -> None:
    """Delete a token; it stops working at once."""
    session.run(lambda d: d.delete_token(user, token_name, actor=actor()))
    if output == "json":
        emit_json({"deleted": True, "user": user, "name": token_name})
        return
    click.echo(f"Token deleted: {token_name} for user: {user}")


# -- API keys ------------------------------------------------------------------------


@cli.group()
def key() -> None:
    """API keys: exchanged at POST /.gateway/token for short-lived JWTs."""


@key.command("create")
@TOKEN_USER
@click.option("--description", help="what the key is for")
@click.option("--expires-at", type=TimeType(), help="ISO 8601 date or date-time (UTC unless a zone is given)")
@click.option("--roles", help="comma-separated roles the key's tokens carry (default: the user's)")
@FORMAT
@pass_session
def key_create(
    session: Session,
    user: str,
    description: str | None,
    expires_at: datetime | None,
    roles: str | None,
    output: str,
) -> None:
    """Create an API key and print its secret once."""
    view, secret = session.run(
        lambda d: d.create_key(
            user,
            actor=actor(),
            description=description,
            expires_at=expires_at,
            roles=None if roles is None else names([roles]),
        )
    )
    if output == "json":
        emit_json({**view.to_json(), "secret": secret})  # as the admin API answers it
        return
    click.echo(KEY_NOTE)
    click.echo(f"Key ID: {view.id}")
    click.echo(f"Key secret: {secret}")
    click.echo(f"Created for user: {user}")
    if view.roles is not None:
        click.echo(f"Roles: {role_list(view.roles)}")
    click.echo(f"Expires at: {expiry(view.expires_at)}")


@key.command("list")
@TOKEN_USER
@FORMAT
@pass_session
def key_list(session: Session, user: str, output: str) -> None:
    """List a user's API keys (never their secrets)."""
    found = session.run(lambda d: d.list_keys(user))
    if output == "json":
        emit_json({"items": [k.to_json() for k in found]})
    else:
        click.echo(keys_table(found))


@key.command("expire")
@click.argument("key_id")
@FORMAT
@pass_session
def key_expire(session: Session, key_id: str, output: str) -> None:
    """Expire a key now: tokens minted from it stop working at once."""

    async def work(directory: Backend) -> KeyView:
        return await directory.expire_key(await directory.key_owner(key_id), key_id, actor=actor())

    view = session.run(work)
    if output == "json":
        emit_json(view.to_json())
        return
    click.echo(f"Key expired: {view.id} of user: {view.user} (expired on {when(view.expires_at)})")


@key.command("delete")
@click.argument("key_id")
@FORMAT
@pass_session
def key_delete(session: Session, key_id: str, output: str) -> None:
    """Delete a key: it and every token minted from it stop working at once."""

    async def work(directory: Backend) -> str:
        owner = await directory.key_owner(key_id)
        await directory.delete_key(owner, key_id, actor=actor())
        return owner

    owner = session.run(work)
    if output == "json":
        emit_json({"deleted": True, "id": key_id, "user": owner})
        return
    click.echo(f"Key deleted: {key_id} of user: {owner}")


# -- signing keys --------------------------------------------------------------------


@cli.group("signing-key")
def signing_key() -> None:
    """The keys that sign access tokens and assertions (their private halves never leave the store)."""


@signing_key.command("list")
@FORMAT
@pass_session
def signing_key_list(session: Session, output: str) -> None:
    """List the signing keys and their state (signing, published, retired, expired, revoked)."""
    from gateway.keyring import key_state, list_keys

    ttl = session.config().signing.token_ttl
    found = session.run_store(list_keys)
    rows = [
        {
            "kid": key.kid,
            "alg": key.alg,
            "state": key_state(key, ttl),
            "created_at": format_time(key.created_at),
            "signs_from": format_time(key.signs_from),
            "retired_at": None if key.retired_at is None else format_time(key.retired_at),
            "revoked_at": None if key.revoked_at is None else format_time(key.revoked_at),
        }
        for key in found
    ]
    if output == "json":
        emit_json({"items": rows})
        return
    columns = ["kid", "alg", "state", "created_at", "signs_from", "retired_at", "revoked_at"]
    headers = [column.upper().replace("_", " ") for column in columns]
    click.echo(table(headers, [[str(row[column] or "-") for column in columns] for row in rows]))


@signing_key.command("rotate")
@click.option("--now", "now_too", is_flag=True, help="sign with it at once (skip signing.publish_ahead)")
@FORMAT
@pass_session
def signing_key_rotate(session: Session, now_too: bool, output: str) -> None:
    """Publish a new signing key; it signs after signing.publish_ahead (or at once with --now)."""
    from gateway.keyring import load_secret, rotate

    config = session.config()
    try:
        secret = load_secret(config, os.environ, may_create=False)
    except GatewayError as exc:
        fail(exc)
    added = session.run_store(lambda store: rotate(store, config, secret, now_too=now_too, actor=actor()))
    if output == "json":
        emit_json({"kid": added.kid, "alg": added.alg, "signs_from": format_time(added.signs_from)})
        return
    click.echo(f"Signing key added: {added.kid} ({added.alg}); it signs from {format_time(added.signs_from)}")


@signing_key.command("revoke")
@click.argument("kid")
@FORMAT
@pass_session
def signing_key_revoke(session: Session, kid: str, output: str) -> None:
    """Revoke a compromised key: it leaves the JWKS and its tokens are refused at once everywhere."""
    from gateway.keyring import revoke

    revoked = session.run_store(lambda store: revoke(store, kid, actor=actor()))
    if output == "json":
        emit_json({"kid": revoked.kid, "revoked": True})
        return
    click.echo(f"Signing key revoked: {revoked.kid}")


# -- audit ---------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """The audit trail of changes."""


@audit.command("list")
@click.option("--actor", "who", metavar="NAME", help="only events by this actor (e.g. cli:alice)")
@click.option("--since", type=TimeType(), help="only events at or after this time")
@click.option("--user", "about", metavar="NAME", help="only events about this user, its tokens and keys")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@FORMAT
@pass_session
def audit_list(
    session: Session, who: str | None, since: datetime | None, about: str | None, limit: int, output: str
) -> None:
    """List audit events, newest first."""
    events: list[AuditView] = session.run(
        lambda d: d.list_audit(actor=who, since=since, limit=limit, user=about)
    )
    if output == "json":
        emit_json({"items": [e.to_json() for e in events]})
    else:
        click.echo(audit_table(events))
