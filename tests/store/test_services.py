"""The service layer (Directory) on both stores: every method, its rules and its error messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import Conflict, Invalid, NotFound
from gateway.services import DEFAULT_ROLE, Directory
from tests.store.conftest import ACTOR

FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


async def test_create_user_defaults_and_json_shape(directory: Directory) -> None:
    view = await directory.create_user("svc-a", actor=ACTOR, description="CI job")
    data = view.to_json()
    assert set(data) == {
        "name",
        "kind",
        "href",
        "description",
        "roles",
        "allowed_origins",
        "disabled",
        "rate_limit",
        "created_at",
        "created_by",
    }
    assert data["name"] == "svc-a" and data["kind"] == "service"
    assert data["href"] == "/v1/service-users/svc-a"
    assert data["description"] == "CI job" and data["disabled"] is False
    assert data["created_by"] == ACTOR
    assert data["allowed_origins"] == []
    assert data["roles"] == [{"name": DEFAULT_ROLE, "assigned_by": ACTOR, "assigned_at": data["created_at"]}]
    assert isinstance(data["created_at"], str) and data["created_at"].endswith("Z")
    assert "." not in data["created_at"]
    assert await directory.get_user("svc-a") == view


async def test_create_user_with_roles_and_origins(directory: Directory) -> None:
    view = await directory.create_user(
        "web",
        actor=ACTOR,
        roles=["writer", "reader", "reader"],
        origins=["https://App.Example.com/", "http://localhost:3000"],
    )
    assert view.role_names == ("reader", "writer")
    assert view.allowed_origins == ("http://localhost:3000", "https://app.example.com")
    assert view.to_json()["description"] is None


@pytest.mark.parametrize("name", ["", "A", "-x", "x y", "a" * 64, "é", "x/y", ".x"])
async def test_create_user_rejects_bad_names(directory: Directory, name: str) -> None:
    with pytest.raises(Invalid) as caught:
        await directory.create_user(name, actor=ACTOR)
    assert caught.value.field == "name"


@pytest.mark.parametrize("name", ["a", "0", "svc.ci_job-1", "a" * 63])
async def test_create_user_accepts_good_names(directory: Directory, name: str) -> None:
    assert (await directory.create_user(name, actor=ACTOR)).name == name


async def test_duplicate_user_is_conflict(directory: Directory) -> None:
    await directory.create_user("dup", actor=ACTOR)
    with pytest.raises(Conflict, match="^user 'dup' already exists$"):
        await directory.create_user("dup", actor=ACTOR, admin=True)


async def test_undefined_role_is_invalid(directory: Directory) -> None:
    with pytest.raises(Invalid, match="^role 'nope' is not defined in policies/$") as caught:
        await directory.create_user("x", actor=ACTOR, roles=["reader", "nope"])
    assert caught.value.field == "roles"
    with pytest.raises(NotFound):
        await directory.get_user("x")


async def test_bad_origin_is_invalid(directory: Directory) -> None:
    with pytest.raises(Invalid) as caught:
        await directory.create_user("x", actor=ACTOR, origins=["ftp://example.com"])
    assert caught.value.field == "allowed_origins"


async def test_admin_identities_hold_no_roles_or_origins(directory: Directory) -> None:
    admin = await directory.create_user("root", actor=ACTOR, admin=True)
    assert admin.kind == "admin" and admin.roles == () and admin.allowed_origins == ()
    with pytest.raises(Invalid, match="^admin identities hold no roles$"):
        await directory.create_user("root2", actor=ACTOR, admin=True, roles=["reader"])
    with pytest.raises(Invalid) as caught:
        await directory.create_user("root3", actor=ACTOR, admin=True, origins=["https://a.example"])
    assert caught.value.field == "allowed_origins"
    with pytest.raises(Invalid, match="^admin identities hold no roles$"):
        await directory.update_user("root", actor=ACTOR, add_roles=["reader"])
    assert (await directory.update_user("root", actor=ACTOR, disabled=True)).disabled


async def test_missing_user_messages(directory: Directory) -> None:
    for call in (
        directory.get_user("ghost"),
        directory.update_user("ghost", actor=ACTOR, disabled=True),
        directory.delete_user("ghost", actor=ACTOR),
        directory.create_token("ghost", "t", actor=ACTOR),
        directory.list_tokens("ghost"),
        directory.reset_token("ghost", "t", actor=ACTOR),
        directory.expire_token("ghost", "t", actor=ACTOR),
        directory.delete_token("ghost", "t", actor=ACTOR),
    ):
        with pytest.raises(NotFound, match="^user 'ghost' not found$"):
            await call


async def test_list_users_sorted_with_prefix_and_role_filters(directory: Directory) -> None:
    await directory.create_user("backend-b", actor=ACTOR, roles=["reader"])
    await directory.create_user("backend-a", actor=ACTOR, roles=["writer"])
    await directory.create_user("monitor", actor=ACTOR, roles=["reader"], origins=["https://m.example"])
    await directory.create_user("back_x", actor=ACTOR, roles=["reader"])
    await directory.create_user("admin", actor=ACTOR, admin=True)
    names = [u.name for u in await directory.list_users()]
    assert names == ["admin", "back_x", "backend-a", "backend-b", "monitor"]
    assert [u.name for u in await directory.list_users(prefix="backend-")] == ["backend-a", "backend-b"]
    # "_" is a literal in a prefix, not a LIKE wildcard.
    assert [u.name for u in await directory.list_users(prefix="back_")] == ["back_x"]
    assert [u.name for u in await directory.list_users(role="reader")] == ["back_x", "backend-b", "monitor"]
    assert [u.name for u in await directory.list_users(prefix="b", role="writer")] == ["backend-a"]
    [monitor] = await directory.list_users(prefix="monitor")
    assert monitor == await directory.get_user("monitor")
    assert await directory.list_users(role="nobody") == []


async def test_update_user_roles_origins_description_disabled(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"], description="old")
    view = await directory.update_user(
        "svc",
        actor="other-admin",
        add_roles=["writer"],
        remove_roles=["reader"],
        add_origins=["https://a.example"],
        description="new",
        disabled=True,
    )
    assert view.role_names == ("writer",)
    assert view.roles[0].assigned_by == "other-admin"
    assert view.allowed_origins == ("https://a.example",)
    assert view.description == "new" and view.disabled
    assert await directory.get_user("svc") == view
    view = await directory.update_user(
        "svc", actor=ACTOR, remove_origins=["HTTPS://A.example"], description=None, disabled=False
    )
    assert view.allowed_origins == () and view.description is None and not view.disabled
    assert await directory.get_user("svc") == view


async def test_update_user_replaces_whole_sets(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "other"], origins=["https://a.example"])
    view = await directory.update_user(
        "svc", actor=ACTOR, roles=["other", "writer"], origins=["https://b.example", "https://c.example"]
    )
    assert view.role_names == ("other", "writer")
    assert view.allowed_origins == ("https://b.example", "https://c.example")
    assert await directory.get_user("svc") == view
    assert (await directory.update_user("svc", actor=ACTOR, roles=[], origins=[])).roles == ()


async def test_update_user_rules(directory: Directory, defined_roles: set[str]) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "other"])
    with pytest.raises(Invalid, match="^role 'ghost' is not defined in policies/$"):
        await directory.update_user("svc", actor=ACTOR, add_roles=["ghost"])
    with pytest.raises(Invalid):
        await directory.update_user("svc", actor=ACTOR, add_roles=["reader"], remove_roles=["reader"])
    with pytest.raises(Invalid):
        await directory.update_user("svc", actor=ACTOR, roles=["reader"], add_roles=["writer"])
    with pytest.raises(Invalid) as caught:
        await directory.update_user("svc", actor=ACTOR, add_origins=["not an origin"])
    assert caught.value.field == "allowed_origins"
    # A role held but dropped from policies/ may stay and may be removed.
    defined_roles.discard("other")
    view = await directory.update_user("svc", actor=ACTOR, roles=["other", "writer"])
    assert view.role_names == ("other", "writer")
    assert (await directory.update_user("svc", actor=ACTOR, remove_roles=["other"])).role_names == ("writer",)


async def test_update_without_changes_writes_no_audit(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"], description="d")
    before = await directory.list_audit()
    await directory.update_user("svc", actor=ACTOR, add_roles=["reader"], description="d", disabled=False)
    assert await directory.list_audit() == before


async def test_delete_user_deletes_tokens_and_audits_their_names(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    await directory.create_token("svc", "b", actor=ACTOR)
    await directory.create_token("svc", "a", actor=ACTOR)
    await directory.delete_user("svc", actor=ACTOR)
    with pytest.raises(NotFound):
        await directory.get_user("svc")
    [event] = await directory.list_audit(limit=1)
    assert (event.action, event.target, event.detail) == ("user.deleted", "user/svc", {"tokens": ["a", "b"]})
    # The name is free again, with no leftover tokens.
    await directory.create_user("svc", actor=ACTOR)
    assert await directory.list_tokens("svc") == []


async def test_create_token_and_json_shape(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "writer"])
    view, secret = await directory.create_token(
        "svc", "ci", actor=ACTOR, description="CI", expires_at=FUTURE, roles=["writer"]
    )
    assert secret.startswith("gw_")
    data = view.to_json()
    assert data == {
        "id": view.id,
        "name": "ci",
        "user": "svc",
        "description": "CI",
        "roles": ["writer"],
        "expires_at": "2099-01-01T00:00:00Z",
        "expired": False,
        "created_at": data["created_at"],
        "created_by": ACTOR,
        "last_used_at": None,
    }
    assert secret not in repr(view) and secret not in str(data)
    follow, _ = await directory.create_token("svc", "all", actor=ACTOR)
    assert follow.to_json()["roles"] is None and follow.to_json()["expires_at"] is None
    assert [t.name for t in await directory.list_tokens("svc")] == ["all", "ci"]
    assert (await directory.list_tokens("svc"))[1] == view


async def test_token_rules(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"])
    await directory.create_token("svc", "t", actor=ACTOR)
    with pytest.raises(Conflict):
        await directory.create_token("svc", "t", actor=ACTOR)
    with pytest.raises(Invalid, match="^role 'writer' is not held by user 'svc'$") as caught:
        await directory.create_token("svc", "u", actor=ACTOR, roles=["reader", "writer"])
    assert caught.value.field == "roles"
    with pytest.raises(Invalid, match="^role 'ghost' is not defined in policies/$") as caught:
        await directory.create_token("svc", "u", actor=ACTOR, roles=["reader", "ghost"])
    assert caught.value.field == "roles"
    with pytest.raises(Invalid) as caught:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await directory.create_token("svc", "u", actor=ACTOR, expires_at=past)
    assert caught.value.field == "expires_at"
    with pytest.raises(Invalid) as caught:
        await directory.create_token("svc", "Bad Name", actor=ACTOR)
    assert caught.value.field == "name"
    for call in (
        directory.reset_token("svc", "nope", actor=ACTOR),
        directory.expire_token("svc", "nope", actor=ACTOR),
        directory.delete_token("svc", "nope", actor=ACTOR),
    ):
        with pytest.raises(NotFound, match="^token 'nope' not found for user 'svc'$"):
            await call
    # Same token name under another user is fine; an empty fixed list is always allowed.
    await directory.create_user("svc2", actor=ACTOR, roles=["reader"])
    view, _ = await directory.create_token("svc2", "t", actor=ACTOR, roles=[])
    assert view.roles == ()


async def test_naive_expiry_is_utc(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    view, _ = await directory.create_token("svc", "t", actor=ACTOR, expires_at=datetime(2099, 1, 1, 12))
    assert view.to_json()["expires_at"] == "2099-01-01T12:00:00Z"


async def test_token_roles_may_name_roles_reached_through_includes(
    directory: Directory, defined_roles: set[str]
) -> None:
    """Least privilege: a writer (writer includes reader) may get a reader-only token."""
    await directory.create_user("svc", actor=ACTOR, roles=["writer", "other"])
    reader, _ = await directory.create_token("svc", "reader", actor=ACTOR, roles=["reader"])
    assert reader.roles == ("reader",)
    both, _ = await directory.create_token("svc", "both", actor=ACTOR, roles=["writer", "reader", "reader"])
    assert both.roles == ("reader", "writer")
    [event] = await directory.list_audit(limit=1)
    assert event.detail["roles"] == ["reader", "writer"]
    # Each refused role is named: first an undefined one (before the user is even looked up) ...
    for user, roles, message in (
        ("svc", ["reader", "nope"], "role 'nope' is not defined in policies/"),
        ("ghost", ["nope"], "role 'nope' is not defined in policies/"),
        # ... then one the user neither holds nor reaches.
        ("svc", ["reader", DEFAULT_ROLE], f"role '{DEFAULT_ROLE}' is not held by user 'svc'"),
    ):
        with pytest.raises(Invalid) as caught:
            await directory.create_token(user, "x", actor=ACTOR, roles=roles)
        assert (caught.value.field, caught.value.message) == ("roles", message)
    await directory.create_user("plain", actor=ACTOR, roles=["reader"])
    with pytest.raises(Invalid, match="^role 'writer' is not held by user 'plain'$"):
        await directory.create_token("plain", "x", actor=ACTOR, roles=["writer"])
    await directory.create_user("root", actor=ACTOR, admin=True)
    with pytest.raises(Invalid, match="^role 'reader' is not held by user 'root'$"):
        await directory.create_token("root", "x", actor=ACTOR, roles=["reader"])
    # A role the user still holds but policies/ no longer defines cannot be given to a token.
    defined_roles.discard("other")
    with pytest.raises(Invalid, match="^role 'other' is not defined in policies/$"):
        await directory.create_token("svc", "x", actor=ACTOR, roles=["other"])
    assert [t.name for t in await directory.list_tokens("svc")] == ["both", "reader"]


async def test_removing_a_role_removes_it_from_fixed_token_roles(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "other", "service-user-project-admin"])
    await directory.create_token("svc", "both", actor=ACTOR, roles=["reader", "other"])
    await directory.create_token("svc", "reader-only", actor=ACTOR, roles=["reader"])
    await directory.create_token("svc", "follow", actor=ACTOR)
    await directory.update_user("svc", actor=ACTOR, remove_roles=["reader"])
    roles = {t.name: t.roles for t in await directory.list_tokens("svc")}
    assert roles == {"both": ("other",), "reader-only": (), "follow": None}
    [event] = await directory.list_audit(limit=1)
    assert event.detail == {
        "roles_removed": ["reader"],
        "token_roles_removed": {"both": ["reader"], "reader-only": ["reader"]},
    }
    # Adding the role back does not restore it in fixed lists.
    await directory.update_user("svc", actor=ACTOR, add_roles=["reader"])
    roles = {t.name: t.roles for t in await directory.list_tokens("svc")}
    assert roles == {"both": ("other",), "reader-only": (), "follow": None}
    # Replacing the role set strips too.
    await directory.update_user("svc", actor=ACTOR, roles=["reader", "service-user-project-admin"])
    assert {t.name: t.roles for t in await directory.list_tokens("svc")}["both"] == ()


async def test_removing_a_role_removes_it_from_fixed_key_roles(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "other", "service-user-project-admin"])
    both, _ = await directory.create_key("svc", actor=ACTOR, roles=["reader", "other"])
    follow, _ = await directory.create_key("svc", actor=ACTOR)
    await directory.update_user("svc", actor=ACTOR, remove_roles=["reader"])
    roles = {k.id: k.roles for k in await directory.list_keys("svc")}
    assert roles == {both.id: ("other",), follow.id: None}
    [event] = await directory.list_audit(limit=1)
    assert event.detail == {"roles_removed": ["reader"], "key_roles_removed": {both.id: ["reader"]}}


async def test_a_token_keeps_a_removed_role_the_user_still_reaches(directory: Directory) -> None:
    """A fixed list loses a role only when the user neither holds nor reaches it after the change."""
    await directory.create_user("svc", actor=ACTOR, roles=["reader", "writer", "other"])
    await directory.create_token("svc", "r", actor=ACTOR, roles=["reader"])
    await directory.create_token("svc", "rw", actor=ACTOR, roles=["reader", "writer"])
    await directory.create_token("svc", "o", actor=ACTOR, roles=["other"])
    await directory.update_user("svc", actor=ACTOR, remove_roles=["reader"])  # writer includes reader
    lists = {t.name: t.roles for t in await directory.list_tokens("svc")}
    assert lists == {"o": ("other",), "r": ("reader",), "rw": ("reader", "writer")}
    [event] = await directory.list_audit(limit=1)
    assert event.detail == {"roles_removed": ["reader"]}
    # writer goes too: now reader is truly lost, and it stays lost when writer comes back.
    await directory.update_user("svc", actor=ACTOR, remove_roles=["writer"])
    [event] = await directory.list_audit(limit=1)
    assert event.detail == {
        "roles_removed": ["writer"],
        "token_roles_removed": {"r": ["reader"], "rw": ["reader", "writer"]},
    }
    await directory.update_user("svc", actor=ACTOR, add_roles=["writer"])
    lists = {t.name: t.roles for t in await directory.list_tokens("svc")}
    assert lists == {"o": ("other",), "r": (), "rw": ()}
    # Replacing writer by reader (PATCH) keeps reader in a list and drops writer.
    await directory.create_token("svc", "r2", actor=ACTOR, roles=["reader", "writer"])
    await directory.update_user("svc", actor=ACTOR, roles=["reader", "other"])
    assert {t.name: t.roles for t in await directory.list_tokens("svc")}["r2"] == ("reader",)


async def test_reset_keeps_id_and_changes_secret(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    view, secret = await directory.create_token(
        "svc", "t", actor=ACTOR, roles=[DEFAULT_ROLE], expires_at=FUTURE
    )
    again, new_secret = await directory.reset_token("svc", "t", actor=ACTOR)
    assert new_secret != secret and new_secret.startswith("gw_")
    assert again == view


async def test_expire_token(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    await directory.create_token("svc", "t", actor=ACTOR)
    before = datetime.now(UTC)
    view = await directory.expire_token("svc", "t", actor=ACTOR)
    assert view.expires_at is not None and before <= view.expires_at <= datetime.now(UTC)
    assert view.to_json()["expired"] is True
    [listed] = await directory.list_tokens("svc")
    assert listed.to_json()["expired"] is True
    # Expiring again keeps the earlier time and writes no second event.
    events = len(await directory.list_audit())
    assert (await directory.expire_token("svc", "t", actor=ACTOR)).expires_at == view.expires_at
    assert len(await directory.list_audit()) == events


async def test_delete_token(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR)
    await directory.create_token("svc", "t", actor=ACTOR)
    await directory.delete_token("svc", "t", actor=ACTOR)
    assert await directory.list_tokens("svc") == []
    await directory.create_token("svc", "t", actor=ACTOR)


async def test_every_change_is_audited_without_secrets(directory: Directory) -> None:
    await directory.create_user("svc", actor="alice", roles=["reader"], origins=["https://a.example"])
    await directory.update_user("svc", actor="bob", add_roles=["writer"], add_origins=["https://b.example"])
    view, secret1 = await directory.create_token("svc", "t", actor="alice", roles=["reader"])
    _, secret2 = await directory.reset_token("svc", "t", actor="alice")
    await directory.expire_token("svc", "t", actor="alice")
    await directory.delete_token("svc", "t", actor="alice")
    await directory.delete_user("svc", actor="bob")
    events = await directory.list_audit()
    assert [(e.action, e.target, e.actor) for e in events] == [
        ("user.deleted", "user/svc", "bob"),
        ("token.deleted", "token/svc/t", "alice"),
        ("token.expired", "token/svc/t", "alice"),
        ("token.reset", "token/svc/t", "alice"),
        ("token.created", "token/svc/t", "alice"),
        ("user.updated", "user/svc", "bob"),
        ("user.created", "user/svc", "alice"),
    ]
    assert events[-2].detail == {"roles_added": ["writer"], "origins_added": ["https://b.example"]}
    assert events[-1].detail["roles"] == ["reader"]
    assert events[2].detail["token_id"] == view.id
    text = repr(events) + str([e.to_json() for e in events])
    for secret in (secret1, secret2):
        assert secret not in text
        assert secret[3:20] not in text
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    data = events[0].to_json()
    assert set(data) == {"id", "at", "actor", "action", "target", "detail"}
    assert isinstance(data["at"], str) and data["at"].endswith("Z")


async def test_list_audit_filters(directory: Directory) -> None:
    await directory.create_user("a", actor="alice")
    await directory.create_user("b", actor="bob")
    await directory.create_user("c", actor="alice")
    assert [e.target for e in await directory.list_audit(actor="alice")] == ["user/c", "user/a"]
    assert [e.target for e in await directory.list_audit(limit=2)] == ["user/c", "user/b"]
    assert await directory.list_audit(since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert len(await directory.list_audit(since=datetime.now(UTC) - timedelta(minutes=1))) == 3
    for limit in (0, 1001):
        with pytest.raises(Invalid) as caught:
            await directory.list_audit(limit=limit)
        assert caught.value.field == "limit"


async def test_a_bare_string_is_not_a_list(directory: Directory) -> None:
    await directory.create_user("svc", actor=ACTOR, roles=["reader"])
    calls = [
        ("roles", directory.create_user("x", actor=ACTOR, roles="reader")),
        ("allowed_origins", directory.create_user("y", actor=ACTOR, origins="https://a.example")),
        ("roles", directory.update_user("svc", actor=ACTOR, add_roles="writer")),
        ("roles", directory.create_token("svc", "t", actor=ACTOR, roles="reader")),
    ]
    for field, call in calls:
        with pytest.raises(Invalid) as caught:
            await call
        assert caught.value.field == field
