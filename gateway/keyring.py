"""The gateway's signing keys: shared through the store, opened with a secret that is not in it.

Imports: config, errors, models, signing, store, timeparse.

Every instance reads the same `signing_keys` rows, so every instance verifies what any
other minted. The private halves are sealed (gateway.signing) with the sealing secret:
`GATEWAY_SECRET_KEY`, else `signing.secret_key_file`, else `gateway.secret` beside
gateway.yaml, which `gateway serve` creates (mode 0600) only while the store holds no
signing key yet, so the embedded default needs no set-up and a second instance never
makes a second secret. Rotation publishes a key `publish_ahead` seconds before it signs;
a retired key stays published until the last token it signed has expired; a revoked key
is gone at once. Each of these writes a change-feed row (user `*signing`) so every
instance re-reads the ring within a second.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from gateway import signing
from gateway.config import Config
from gateway.errors import ConfigError, NotFound
from gateway.models import AuditEvent, SigningKey
from gateway.models import Change as ChangeRow
from gateway.store import CHANGES_LOCK, Store, translate_errors
from gateway.timeparse import format_time, utcnow

log = logging.getLogger("gateway.keyring")

SIGNING_CHANGE = "*signing"  # the change-feed "user" of signing-key changes (no user can be named so)
SECRET_VARIABLE = "GATEWAY_SECRET_KEY"  # noqa: S105 -- the variable's name, not a secret
SECRET_FILE = "gateway.secret"  # noqa: S105 -- a file name
_SIGNING_LOCK = 0x6777_0003


@dataclass(frozen=True, slots=True)
class RingKey:
    """One signing key as an instance holds it (the private half only when it opened)."""

    kid: str
    alg: str
    public: signing.PublicKey
    private: signing.PrivateKey | None
    created_at: float
    signs_from: float
    retired_at: float | None


class KeyRing:
    """The signing keys not revoked: which one signs now, which verify, what the JWKS shows."""

    def __init__(self, keys: list[RingKey], token_ttl: float) -> None:
        self.keys = sorted(keys, key=lambda key: (key.signs_from, key.created_at))
        self._token_ttl = token_ttl
        self._verify: dict[str, signing.VerifyKey] = {
            key.kid: signing.VerifyKey(key.kid, key.alg, key.public) for key in self.keys
        }

    def published(self, now: float) -> list[RingKey]:
        """Keys a verifier may meet: all but those retired longer ago than a token lives."""
        return [k for k in self.keys if k.retired_at is None or k.retired_at + self._token_ttl > now]

    def verify_keys(self, now: float) -> Mapping[str, signing.VerifyKey]:
        """Key id → key, for verification now."""
        return {key.kid: self._verify[key.kid] for key in self.published(now)}

    def signer(self, now: float) -> RingKey | None:
        """The key that signs now: the newest whose time has come (None: no key opened)."""
        for key in reversed(self.keys):
            retired = key.retired_at is not None and key.retired_at <= now
            if key.signs_from <= now and not retired and key.private is not None:
                return key
        return None

    def jwks(self, now: float) -> dict[str, Any]:
        """The JWKS document: every published public key, one published ahead of use included."""
        return {"keys": [signing.public_jwk(key.kid, key.alg, key.public) for key in self.published(now)]}


def secret_path(config: Config) -> Path:
    """Where the sealing secret's file is (when GATEWAY_SECRET_KEY is not set)."""
    return config.signing.secret_key_file or config.path.parent / SECRET_FILE


def load_secret(config: Config, env: Mapping[str, str], *, may_create: bool) -> bytes:
    """The sealing secret; creates the secret file only when `may_create` (an empty ring)."""
    text = env.get(SECRET_VARIABLE)
    if text:
        try:
            return signing.secret_from_text(text)
        except ValueError as exc:
            raise ConfigError([f"{SECRET_VARIABLE}: {exc}"]) from None
    path = secret_path(config)
    try:
        return signing.secret_from_text(path.read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: the signing secret cannot be read: {exc}"]) from None
    if not may_create:
        raise ConfigError(
            [
                f"{path}: missing: the store holds signing keys, so their secret must be given "
                f"({SECRET_VARIABLE}, signing.secret_key_file, or the {SECRET_FILE} of the first instance)"
            ]
        )
    secret = signing.new_secret_text()
    # Written whole under another name, then linked into place: a process starting at the same
    # moment finds either no file or the whole secret, never a half-written one.
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secret + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:  # another process made it just now: use theirs
            return signing.secret_from_text(path.read_text())
        finally:
            draft.unlink()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot create the signing secret: {exc.strerror}"]) from None
    log.warning("created the signing secret (keep it with the store's backups)", extra={"path": str(path)})
    return signing.secret_from_text(secret)


async def open_ring(store: Store, config: Config, env: Mapping[str, str]) -> tuple[KeyRing, bytes]:
    """The key ring of the store (its first key made now if it has none) and the sealing secret.

    ConfigError names the kid of a current key this secret cannot open.
    """
    rows = await _rows(store)
    if rows:
        secret = load_secret(config, env, may_create=False)
    else:
        secret = load_secret(config, env, may_create=True)
        await _first_key(store, config, secret)
        rows = await _rows(store)
    return ring_from_rows(rows, secret, config.signing.token_ttl), secret


async def reload_ring(store: Store, secret: bytes, token_ttl: float) -> KeyRing:
    """The ring as the store has it now (after a rotation or revocation elsewhere)."""
    return ring_from_rows(await _rows(store), secret, token_ttl)


def ring_from_rows(rows: list[SigningKey], secret: bytes, token_ttl: float) -> KeyRing:
    """Open every key that signs now or will; a current key that does not open is an error."""
    keys: list[RingKey] = []
    now = utcnow()
    for row in rows:
        private: signing.PrivateKey | None = None
        if row.retired_at is None or row.retired_at > now:  # signs now, or will
            try:
                private = signing.unseal(row.sealed, row.kid, secret)
            except signing.SealError:
                problem = f"signing key {row.kid} does not open with this secret"
                raise ConfigError([f"{problem} ({SECRET_VARIABLE} or the secret file)"]) from None
        keys.append(
            RingKey(
                kid=row.kid,
                alg=row.alg,
                public=signing.load_public(row.public_pem),
                private=private,
                created_at=row.created_at.timestamp(),
                signs_from=row.signs_from.timestamp(),
                retired_at=None if row.retired_at is None else row.retired_at.timestamp(),
            )
        )
    return KeyRing(keys, token_ttl)


async def _rows(store: Store) -> list[SigningKey]:
    async with translate_errors(), store.sessions() as session:
        found = await session.scalars(select(SigningKey).where(SigningKey.revoked_at.is_(None)))
        return list(found)


async def _first_key(store: Store, config: Config, secret: bytes) -> None:
    """The store's first signing key, made by exactly one of several instances starting at once."""
    async with translate_errors(), store.write_sessions.begin() as session:
        if store.dialect == "postgresql":
            await session.execute(select(func.pg_advisory_xact_lock(_SIGNING_LOCK)))
        if await session.scalar(select(func.count()).select_from(SigningKey)):
            return
        now = utcnow()
        kid = _add_key(session, config.signing.alg, secret, now, now)
        session.add(
            AuditEvent(
                at=now,
                actor="gateway",
                action="signing_key.rotated",
                target=f"signing_key/{kid}",
                detail={"kid": kid, "alg": config.signing.alg, "signs_from": format_time(now), "first": True},
            )
        )


def _add_key(session: Any, alg: str, secret: bytes, now: datetime, signs_from: datetime) -> str:
    private = signing.generate(alg)
    kid = signing.new_kid()
    session.add(
        SigningKey(
            kid=kid,
            alg=alg,
            public_pem=signing.public_pem(private),
            sealed=signing.seal(private, kid, secret),
            created_at=now,
            signs_from=signs_from,
            retired_at=None,
            revoked_at=None,
        )
    )
    return kid


async def rotate(store: Store, config: Config, secret: bytes, *, now_too: bool, actor: str) -> SigningKey:
    """Add a new signing key: published at once, signing after `publish_ahead` (or at once);
    the keys it replaces retire then and stay published while their tokens may live."""
    now = utcnow()
    starts = now if now_too else now + timedelta(seconds=config.signing.publish_ahead)
    async with translate_errors(), store.write_sessions.begin() as session:
        await _lock_changes(store, session)
        # Every key still signing at `starts`: the current one, and one a pending rotation would
        # have retired later (a `--now` after it must not leave the old key signing meanwhile).
        current = list(
            await session.scalars(
                select(SigningKey).where(
                    SigningKey.revoked_at.is_(None),
                    or_(SigningKey.retired_at.is_(None), SigningKey.retired_at > starts),
                )
            )
        )
        for old in current:
            # A key sealed with another secret would open on no instance: refuse before adding it.
            try:
                signing.unseal(old.sealed, old.kid, secret)
            except signing.SealError:
                raise ConfigError(
                    [f"signing key {old.kid} does not open with this secret: rotate with the gateway's own"]
                ) from None
        kid = _add_key(session, config.signing.alg, secret, now, starts)
        for old in current:
            old.retired_at = starts
        session.add(
            AuditEvent(
                at=now,
                actor=actor,
                action="signing_key.rotated",
                target=f"signing_key/{kid}",
                detail={"kid": kid, "alg": config.signing.alg, "signs_from": format_time(starts)},
            )
        )
        session.add(ChangeRow(at=now, user_name=SIGNING_CHANGE, token_id=None))
        await session.flush()
        added = await session.get(SigningKey, kid)
        assert added is not None
        return added


async def revoke(store: Store, kid: str, *, actor: str) -> SigningKey:
    """Revoke a (compromised) key: out of the JWKS, and its tokens refused, at once everywhere."""
    now = utcnow()
    async with translate_errors(), store.write_sessions.begin() as session:
        await _lock_changes(store, session)
        key = await session.get(SigningKey, kid)
        if key is None:
            raise NotFound(f"signing key '{kid}' not found")
        if key.revoked_at is None:
            key.revoked_at = now
            session.add(
                AuditEvent(
                    at=now,
                    actor=actor,
                    action="signing_key.revoked",
                    target=f"signing_key/{kid}",
                    detail={"kid": kid},
                )
            )
            session.add(ChangeRow(at=now, user_name=SIGNING_CHANGE, token_id=None))
        return key


async def list_keys(store: Store) -> list[SigningKey]:
    """Every signing key, revoked ones included (never a private half: `sealed` stays unread)."""
    async with translate_errors(), store.sessions() as session:
        return list(await session.scalars(select(SigningKey).order_by(SigningKey.created_at)))


async def _lock_changes(store: Store, session: Any) -> None:
    if store.dialect == "postgresql":
        # As services do: change ids become visible in increasing order.
        await session.execute(select(func.pg_advisory_xact_lock(CHANGES_LOCK)))


def key_state(key: SigningKey, token_ttl: float, now: float | None = None) -> str:
    """`signing`, `published` (ahead of use), `retired` (verifying only), `expired` or `revoked`."""
    moment = time.time() if now is None else now
    if key.revoked_at is not None:
        return "revoked"
    if key.retired_at is not None and key.retired_at.timestamp() <= moment:
        return "retired" if key.retired_at.timestamp() + token_ttl > moment else "expired"
    return "signing" if key.signs_from.timestamp() <= moment else "published"
