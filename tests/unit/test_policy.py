"""policies/ loading and the RouteTable: globs, routing, shadowing, permissions, every error at file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import Config, RouteConfig, load_config
from gateway.errors import ConfigError
from gateway.policy import (
    Role,
    RoutePolicy,
    RouteTable,
    Rule,
    glob_covers,
    load_route_table,
    parse_glob,
)

REPO = Path(__file__).resolve().parents[2]

GATEWAY_YAML = """\
routes:
  - name: orders
    prefix: /orders
    upstream: http://127.0.0.1:9000
  - name: special
    prefix: /orders/special
    upstream: http://127.0.0.1:9000
  - name: root
    prefix: /
    upstream: http://127.0.0.1:9000
"""

# Rules for every route of GATEWAY_YAML, for tests about something else.
ALL_RULES = """\
routes:
  orders:
    rules:
      - paths: ["/orders/**"]
        require: "orders:read"
  special:
    rules:
      - paths: ["/orders/special/**"]
        require: "orders:special"
  root:
    rules:
      - paths: ["/**"]
        public: true
"""


def config_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], gateway_yaml: str = GATEWAY_YAML
) -> Config:
    """Write gateway.yaml and policies/<files> into tmp_path (the current directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gateway.yaml").write_text(gateway_yaml)
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return load_config("gateway.yaml", env={})


def problems_of(config: Config) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_route_table(config)
    assert info.value.problems
    return info.value.problems


# --- globs ------------------------------------------------------------------------------------


def rule(*paths: str, methods: tuple[str, ...] | None = None) -> Rule:
    return Rule(frozenset(methods) if methods else None, paths, "x:y", False, "test:1")


@pytest.mark.parametrize(
    ("glob", "path", "expected"),
    [
        ("/orders/**", "/orders", True),
        ("/orders/**", "/orders/", True),
        ("/orders/**", "/orders/a", True),
        ("/orders/**", "/orders/a/b/c", True),
        ("/orders/**", "/ordersX", False),
        ("/orders/**", "/orders-x/a", False),
        ("/orders/**", "/Orders/a", False),
        ("/orders/*", "/orders/a", True),
        ("/orders/*", "/orders", False),
        ("/orders/*", "/orders/", False),
        ("/orders/*", "/orders/a/b", False),
        ("/orders/*/items", "/orders/42/items", True),
        ("/orders/*/items", "/orders/items", False),
        ("/orders/**/items", "/orders/items", True),
        ("/orders/**/items", "/orders/a/b/items", True),
        ("/orders/**/items", "/orders/a/b/items/x", False),
        ("/orders/", "/orders/", True),
        ("/orders/", "/orders", False),
        ("/orders/", "/orders/a", False),
        ("/orders", "/orders", True),
        ("/orders", "/orders/", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/", "/", True),
        ("/", "/a", False),
        ("/*", "/a", True),
        ("/*", "/", False),
        ("/a.b/c+d", "/a.b/c+d", True),
        ("/a.b/c+d", "/aXb/c+d", False),
        ("/files/a b", "/files/a b", True),
        ("/files/*", "/files/a b", True),
        # several "**" (matched by `_GlobNfa`, not a regex: see test_glob_matching.py)
        ("/a/**/b/**", "/a/b", True),
        ("/a/**/b/**", "/a/x/b/y/z", True),
        ("/a/**/b/**", "/a/x", False),
        ("/a/**/**", "/a", True),
        ("/**/b/**/", "/b/", True),
        ("/**/b/**/", "/b", False),
    ],
)
def test_glob_matching(glob: str, path: str, expected: bool) -> None:
    assert rule(glob).matches("GET", path) is expected


def test_rule_methods_and_any_of_its_paths() -> None:
    r = rule("/a/**", "/b", methods=("GET", "HEAD"))
    assert r.matches("GET", "/a/x") and r.matches("HEAD", "/b")
    assert not r.matches("POST", "/a/x")
    assert not r.matches("GET", "/c")
    assert not r.matches("get", "/a/x")  # methods are compared upper-case, as HTTP sends them


@pytest.mark.parametrize(
    ("glob", "fragment"),
    [
        ("orders/**", "must start with '/'"),
        ("/orders//x", "empty segment"),
        ("/orders/./x", "'.' or '..' segments"),
        ("/orders/..", "'.' or '..' segments"),
        ("/orders/a*", "'*' must be a whole segment"),
        ("/orders/***", "'*' must be a whole segment"),
        ("/orders/%2F", "must not contain '%'"),
        ("/orders?x=1", "must not contain '%', '?'"),
        ("/orders#x", "must not contain '%', '?', '#'"),
    ],
)
def test_bad_globs(glob: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_glob(glob)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("wide", "narrow", "expected"),
    [
        ("/a/**", "/a/*", True),
        ("/a/**", "/a/b/c", True),
        ("/a/**", "/a", True),
        ("/a/**", "/a/", True),
        ("/a/**", "/a/**/b", True),
        ("/**", "/a/*/b/**", True),
        ("/**", "/", True),
        ("/a/*", "/a/b", True),
        ("/a/*", "/a/*", True),
        ("/*/b", "/a/b", True),
        ("/a/*/**", "/a/b/c/**", True),
        ("/**/b", "/a/**/b", True),
        ("/a/*", "/a/**", False),  # /a and /a/b/c are not one segment below /a
        ("/a/*", "/a/", False),  # "*" is a non-empty segment
        ("/a/**", "/b/**", False),
        ("/a/b", "/a/*", False),
        ("/a/*/c", "/a/**/c", False),
        ("/a", "/a/", False),
        ("/a/**/c", "/a/**", False),
        ("/*/**", "/**", False),  # "/" is not matched by "/*/**"
        ("/a/**/b/**", "/a/**", False),
    ],
)
def test_glob_covers(wide: str, narrow: str, expected: bool) -> None:
    assert glob_covers(parse_glob(wide), parse_glob(narrow)) is expected


COVER_CHECK_PATHS = [
    "/",
    "/a",
    "/a/",
    "/a/b",
    "/a/b/",
    "/a/b/c",
    "/a/c",
    "/b",
    "/b/a",
    "/a/b/b",
    "/a/x/c",
    "/a/b/c/d",
    "/x/b",
]


@pytest.mark.parametrize("wide", ["/a/**", "/a/*", "/**", "/*/b", "/a/**/c", "/a/*/**", "/*/**", "/a/", "/a"])
@pytest.mark.parametrize("narrow", ["/a/**", "/a/*", "/**", "/*/b", "/a/**/c", "/a/b", "/a/b/c", "/a/", "/*"])
def test_glob_covers_is_sound(wide: str, narrow: str) -> None:
    # Never claim coverage that a concrete path disproves.
    if glob_covers(parse_glob(wide), parse_glob(narrow)):
        for path in COVER_CHECK_PATHS:
            if rule(narrow).matches("GET", path):
                assert rule(wide).matches("GET", path), (wide, narrow, path)


# --- routing ----------------------------------------------------------------------------------


def table_of(*prefixes: str) -> RouteTable:
    routes = [
        RoutePolicy(RouteConfig(name=f"r{i}", prefix=p, upstream="http://h"), ())
        for i, p in enumerate(prefixes)
    ]
    return RouteTable({}, routes)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders", "/orders"),
        ("/orders/", "/orders"),
        ("/orders/x", "/orders"),
        ("/orders/special", "/orders/special"),
        ("/orders/special/", "/orders/special"),
        ("/orders/special/1", "/orders/special"),
        ("/orders/specialX", "/orders"),
        ("/ordersX", "/"),
        ("/order", "/"),
        ("/", "/"),
        ("/other/orders", "/"),
        ("/a/b/c/d", "/a/b"),
        ("/a/b", "/a/b"),
        ("/a", "/"),
    ],
)
def test_longest_prefix_on_segment_boundary(path: str, expected: str) -> None:
    route = table_of("/orders", "/orders/special", "/", "/a/b").route(path)
    assert route is not None and route.config.prefix == expected


def test_no_route_without_root() -> None:
    table = table_of("/orders")
    assert table.route("/ordersX") is None
    assert table.route("/") is None
    assert table.route("/other") is None


def test_first_match_is_ordered_and_method_aware() -> None:
    webhook = Rule(frozenset({"POST"}), ("/orders/webhook",), None, True, "f:1")
    read = Rule(frozenset({"GET", "HEAD"}), ("/orders/**",), "orders:read", False, "f:2")
    write = Rule(frozenset({"POST"}), ("/orders/**",), "orders:write", False, "f:3")
    anything = Rule(None, ("/orders/admin/**",), "orders:admin", False, "f:4")
    policy = RoutePolicy(
        RouteConfig(name="orders", prefix="/orders", upstream="http://h"), (webhook, read, write, anything)
    )
    assert policy.first_match("POST", "/orders/webhook") is webhook
    assert policy.first_match("POST", "/orders/1") is write
    assert policy.first_match("GET", "/orders/webhook") is read
    assert policy.first_match("HEAD", "/orders") is read
    assert policy.first_match("DELETE", "/orders/admin/x") is anything
    assert policy.first_match("DELETE", "/orders/1") is None
    assert policy.first_match("PROPFIND", "/orders/admin") is anything


# --- permissions ------------------------------------------------------------------------------


def roles_table() -> RouteTable:
    roles = [
        Role("admin", None, ("*",), (), "f:1"),
        Role("orders-all", None, ("orders:*",), (), "f:2"),
        Role("reader", None, ("orders:read",), (), "f:3"),
        Role("writer", "w", ("orders:write",), ("reader",), "f:4"),
        Role("chain", None, (), ("writer",), "f:5"),
        Role("deep", None, ("a:b:*",), (), "f:6"),
    ]
    return RouteTable({r.name: r for r in roles}, ())


@pytest.mark.parametrize(
    ("roles", "permission", "expected"),
    [
        (("admin",), "anything:at:all", True),
        (("admin",), "x", True),
        (("orders-all",), "orders:read", True),
        (("orders-all",), "orders:x:y", True),
        (("orders-all",), "orders", False),
        (("orders-all",), "ordersx:read", False),
        (("orders-all",), "billing:read", False),
        (("reader",), "orders:read", True),
        (("reader",), "orders:write", False),
        (("reader",), "orders:read:x", False),
        (("writer",), "orders:read", True),  # via includes
        (("writer",), "orders:write", True),
        (("chain",), "orders:read", True),  # includes are transitive
        (("deep",), "a:b:c", True),
        (("deep",), "a:c", False),
        (("deep",), "a:b", False),
        (("undefined",), "orders:read", False),
        (("undefined", "reader"), "orders:read", True),
        ((), "orders:read", False),
    ],
)
def test_allows(roles: tuple[str, ...], permission: str, expected: bool) -> None:
    assert roles_table().allows(roles, permission) is expected


def test_granted_expands_includes_and_ignores_undefined_roles() -> None:
    table = roles_table()
    assert table.granted(("chain",)) == {"orders:read", "orders:write"}
    assert table.granted(("nope",)) == frozenset()
    assert table.granted(("reader", "nope")) == {"orders:read"}
    assert table.granted(("chain",)) is table.granted(("chain",))  # memoised
    assert table.role_names() == {"admin", "orders-all", "reader", "writer", "chain", "deep"}


def test_granted_memo_is_bounded() -> None:
    table = roles_table()
    for index in range(10_000):
        table.granted((f"junk-{index}",))
    assert len(table._granted) <= 4096


# --- loading ----------------------------------------------------------------------------------


def test_load_merges_files_in_name_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with(
        tmp_path,
        monkeypatch,
        {
            "20-routes.yml": ALL_RULES,
            "10-roles.yaml": """\
            roles:
              reader:
                description: Read orders
                permissions: ["orders:read"]
              writer:
                includes: [reader]
                permissions: ["orders:write"]
            """,
            "notes.txt": "not: [yaml",
            ".#20-routes.yaml": "broken: [",
        },
    )
    table = load_route_table(config)
    assert [route.config.name for route in table.routes] == ["orders", "special", "root"]
    assert table.roles["writer"] == Role(
        "writer", None, ("orders:write",), ("reader",), "policies/10-roles.yaml:5"
    )
    assert table.roles["reader"].description == "Read orders"
    assert table.granted(("writer",)) == {"orders:read", "orders:write"}
    orders = table.route("/orders/1")
    assert orders is not None and orders.rules[0].source == "policies/20-routes.yml:4"
    assert orders.rules[0].require == "orders:read" and orders.rules[0].methods is None
    root = table.route("/x")
    assert root is not None and root.first_match("GET", "/x") is not None and root.rules[0].public
    assert table.warnings == ()


def test_policies_may_be_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gateway.yaml").write_text(GATEWAY_YAML + "policies: all.yaml\n")
    (tmp_path / "all.yaml").write_text("roles:\n  r:\n    permissions: [x]\n" + ALL_RULES)
    table = load_route_table(load_config("gateway.yaml", env={}))
    assert table.role_names() == {"r"}


def test_missing_policies_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gateway.yaml").write_text(GATEWAY_YAML)
    [problem] = problems_of(load_config("gateway.yaml", env={}))
    assert problem.startswith("policies: policies folder or file not found")


def test_methods_are_stored_upper_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = ALL_RULES.replace(
        '      - paths: ["/orders/**"]', '      - methods: [GET, HEAD]\n        paths: ["/orders/**"]'
    )
    table = load_route_table(config_with(tmp_path, monkeypatch, {"p.yaml": rules}))
    assert table.routes[0].rules[0].methods == frozenset({"GET", "HEAD"})


# Each case: policy file text (policies/p.yaml, dedented), expected "file:line: message".
POLICY_ERRORS = [
    ("rolez: {}\n" + ALL_RULES, "policies/p.yaml:1: rolez: unknown key; did you mean 'roles'?"),
    (
        "roles:\n  Reader:\n    permissions: [x]\n" + ALL_RULES,
        "policies/p.yaml:2: roles.Reader: role names must match ^[a-z0-9][a-z0-9._-]{0,62}$",
    ),
    (
        "roles:\n  r:\n    permission: [x]\n" + ALL_RULES,
        "policies/p.yaml:3: roles.r.permission: unknown key; did you mean 'permissions'?",
    ),
    (
        "roles:\n  r:\n    permissions: [x]\n  r:\n    permissions: [y]\n" + ALL_RULES,
        "policies/p.yaml:4: duplicate key 'r' (first defined at line 2)",
    ),
    (
        "roles:\n  r:\n    includes: [ghost]\n" + ALL_RULES,
        "policies/p.yaml:3: roles.r.includes: role 'ghost' is not defined",
    ),
    (
        "roles:\n  a:\n    includes: [b]\n  b:\n    includes: [a]\n" + ALL_RULES,
        "policies/p.yaml:5: roles.b.includes: include cycle: a -> b -> a",
    ),
    (
        "roles:\n  a:\n    includes: [a]\n" + ALL_RULES,
        "policies/p.yaml:3: roles.a.includes: include cycle: a -> a",
    ),
    (
        "roles:\n  r:\n    permissions:\n      - ok:read\n      - 'ord*'\n" + ALL_RULES,
        "policies/p.yaml:5: roles.r.permissions[1]: 'ord*' is not a permission (NAME[:PART...], '*' "
        "only as a "
        "whole last part like 'orders:*', or '*' alone)",
    ),
    (
        "roles:\n  r:\n    permissions: ['a:*:b']\n" + ALL_RULES,
        "policies/p.yaml:3: roles.r.permissions[0]: 'a:*:b' is not a permission (NAME[:PART...], '*' "
        "only as a "
        "whole last part like 'orders:*', or '*' alone)",
    ),
    (
        "roles:\n  r:\n    permissions: ['orders read']\n" + ALL_RULES,
        "policies/p.yaml:3: roles.r.permissions[0]: 'orders read' is not a permission "
        "(NAME[:PART...], '*' only as a "
        "whole last part like 'orders:*', or '*' alone)",
    ),
    (
        "roles:\n  r:\n    description: [x]\n" + ALL_RULES,
        "policies/p.yaml:3: roles.r.description: must be a string, not a list",
    ),
    (
        ALL_RULES + "  billing:\n    rules:\n      - paths: ['/b']\n        public: true\n",
        "policies/p.yaml:14: routes.billing: route 'billing' is not defined in gateway.yaml",
    ),
    (
        ALL_RULES.replace(
            '    rules:\n      - paths: ["/orders/**"]', '    rulez:\n      - paths: ["/orders/**"]', 1
        ),
        "policies/p.yaml:3: routes.orders.rulez: unknown key; did you mean 'rules'?",
    ),
    (
        ALL_RULES.replace('require: "orders:read"', 'require: "orders:read"\n        public: true'),
        "policies/p.yaml:4: routes.orders.rules[0]: give either `require: PERMISSION` or `public: "
        "true`, not both",
    ),
    (
        ALL_RULES.replace('require: "orders:read"', "public: false"),
        "policies/p.yaml:4: routes.orders.rules[0]: needs `require: PERMISSION` or `public: true`",
    ),
    (
        ALL_RULES.replace('require: "orders:read"', "public: yes"),
        "policies/p.yaml:5: routes.orders.rules[0].public: must be true or false, not 'yes'",
    ),
    (
        ALL_RULES.replace('require: "orders:read"', 'require: "orders:*"'),
        "policies/p.yaml:5: routes.orders.rules[0].require: must name one permission, not a wildcard",
    ),
    (
        ALL_RULES.replace('require: "orders:read"', 'require: "orders read"'),
        "policies/p.yaml:5: routes.orders.rules[0].require: 'orders read' is not a permission",
    ),
    (
        ALL_RULES.replace('"/orders/**"', '"/orders/x*"'),
        "policies/p.yaml:4: routes.orders.rules[0].paths[0]: bad glob '/orders/x*': '*' must be a "
        "whole segment "
        "('*' or '**'), not part of 'x*'",
    ),
    (
        ALL_RULES.replace('["/orders/**"]', "[]"),
        "policies/p.yaml:4: routes.orders.rules[0].paths: is required: a non-empty list of path globs",
    ),
    (
        ALL_RULES.replace(
            '      - paths: ["/orders/**"]', '      - methods: [get]\n        paths: ["/orders/**"]'
        ),
        "policies/p.yaml:4: routes.orders.rules[0].methods[0]: methods are upper-case: write 'GET'",
    ),
    (
        ALL_RULES.replace(
            '      - paths: ["/orders/**"]', '      - methods: ["BAD METHOD"]\n        paths: ["/orders/**"]'
        ),
        "policies/p.yaml:4: routes.orders.rules[0].methods[0]: 'BAD METHOD' is not an HTTP method",
    ),
    (
        ALL_RULES.replace(
            '      - paths: ["/orders/**"]', '      - methods: []\n        paths: ["/orders/**"]'
        ),
        "policies/p.yaml:4: routes.orders.rules[0].methods: must not be empty (omit it: any method)",
    ),
    (
        ALL_RULES.replace('      - paths: ["/orders/**"]', '      - desc: x\n        paths: ["/orders/**"]'),
        "policies/p.yaml:4: routes.orders.rules[0].desc: unknown key; expected one of: methods, "
        "paths, require, "
        "public",
    ),
    (
        ALL_RULES.replace('  root:\n    rules:\n      - paths: ["/**"]\n        public: true\n', ""),
        "gateway.yaml:8: route 'root' has no rules in policies/: every request would be refused",
    ),
    (
        ALL_RULES.replace(
            '  root:\n    rules:\n      - paths: ["/**"]\n        public: true\n', "  root:\n    rules: []\n"
        ),
        "gateway.yaml:8: route 'root' has no rules in policies/: every request would be refused",
    ),
    ("roles: [a]\n" + ALL_RULES, "policies/p.yaml:1: roles: must be a mapping, not a list"),
    (
        "roles:\n  a: {x\n",
        "policies/p.yaml:3: expected ',' or '}', but got '<stream end>' "
        "(while parsing a flow mapping at line 2)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), POLICY_ERRORS)
def test_policy_error_at_file_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    config = config_with(tmp_path, monkeypatch, {"p.yaml": text})
    assert expected in problems_of(config)


def test_role_defined_in_two_files_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with(
        tmp_path,
        monkeypatch,
        {
            "00-a.yaml": "roles:\n  reader:\n    permissions: [x]\n",
            "10-b.yaml": "# comment\nroles:\n  other: {}\n  reader:\n    permissions: [y]\n" + ALL_RULES,
        },
    )
    assert problems_of(config) == [
        "policies/10-b.yaml:4: roles.reader: role 'reader' is already defined at policies/00-a.yaml:2"
    ]


def test_route_rules_in_two_files_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with(
        tmp_path,
        monkeypatch,
        {
            "00-a.yaml": ALL_RULES,
            "10-b.yaml": "routes:\n  special:\n    rules:\n      - paths: ['/orders/special']\n      "
            "  public: true\n",
        },
    )
    assert problems_of(config) == [
        "policies/10-b.yaml:2: routes.special: rules for route 'special' are already given at "
        "policies/00-a.yaml:6"
    ]


def test_every_problem_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_with(
        tmp_path,
        monkeypatch,
        {
            "a.yaml": "roles:\n  Bad: {}\n  r:\n    includes: [ghost]\n",
            "b.yaml": "routes:\n  orders:\n    rules:\n      - paths: [x]\n        require: y\n",
        },
    )
    assert problems_of(config) == [
        "policies/a.yaml:2: roles.Bad: role names must match ^[a-z0-9][a-z0-9._-]{0,62}$",
        "policies/a.yaml:4: roles.r.includes: role 'ghost' is not defined",
        "policies/b.yaml:4: routes.orders.rules[0].paths[0]: bad glob 'x': must start with '/'",
        # orders has a (bad) rule, reported above; the other two have none at all.
        "gateway.yaml:5: route 'special' has no rules in policies/: every request would be refused",
        "gateway.yaml:8: route 'root' has no rules in policies/: every request would be refused",
    ]


def test_empty_policies_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of(config_with(tmp_path, monkeypatch, {}))
    assert "policies: no *.yaml policy files in this folder" in problems
    assert (
        "gateway.yaml:2: route 'orders' has no rules in policies/: every request would be refused" in problems
    )


# --- shadowed rules ---------------------------------------------------------------------------

SHADOW_CASES = [
    # (rules of route "orders" as YAML flow items,
    #  (index of the shadowed rule, index of the shadowing one) or None)
    (['{paths: ["/orders/**"], require: a}', '{paths: ["/orders/x"], require: b}'], (1, 0)),
    (['{paths: ["/orders/**"], require: a}', '{methods: [GET], paths: ["/orders/*/y"], require: b}'], (1, 0)),
    (
        [
            '{methods: [GET, POST], paths: ["/orders/*"], require: a}',
            '{methods: [GET], paths: ["/orders/1"], public: true}',
        ],
        (1, 0),
    ),
    (
        [
            '{paths: ["/orders/a", "/orders/b/**"], require: a}',
            '{paths: ["/orders/b/c", "/orders/a"], require: b}',
        ],
        (1, 0),
    ),
    (['{paths: ["/orders/x"], require: a}', '{paths: ["/orders/x"], require: b}'], (1, 0)),
    (
        [
            '{methods: [GET], paths: ["/orders/**"], require: a}',
            '{methods: [POST], paths: ["/orders/x"], require: b}',
            '{methods: [POST], paths: ["/orders/x/**"], require: c}',
        ],
        None,
    ),
    (
        [
            '{methods: [GET], paths: ["/orders/**"], require: a}',
            '{methods: [POST], paths: ["/orders/**"], require: b}',
            '{methods: [GET, POST], paths: ["/orders/1"], require: c}',
        ],
        None,
    ),  # covered only by two rules together
    (['{paths: ["/orders/*"], require: a}', '{paths: ["/orders/**"], require: b}'], None),
    (['{paths: ["/orders/x"], require: a}', '{paths: ["/orders/**"], require: b}'], None),
    (['{methods: [GET], paths: ["/orders/**"], require: a}', '{paths: ["/orders/x"], require: b}'], None),
    (['{paths: ["/orders/*"], require: a}', '{paths: ["/orders/"], require: b}'], None),
    (['{paths: ["/orders/a"], require: a}', '{paths: ["/orders/a", "/orders/b"], require: b}'], None),
    (
        [
            '{methods: [POST], paths: ["/orders/webhook"], public: true}',
            '{methods: [POST], paths: ["/orders/**"], require: b}',
        ],
        None,
    ),
]


@pytest.mark.parametrize(("rules", "shadow"), SHADOW_CASES)
def test_shadowed_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rules: list[str], shadow: tuple[int, int] | None
) -> None:
    text = ALL_RULES.replace(
        '      - paths: ["/orders/**"]\n        require: "orders:read"\n',
        "".join(f"      - {r}\n" for r in rules),
    )
    config = config_with(tmp_path, monkeypatch, {"p.yaml": text})
    if shadow is None:
        table = load_route_table(config)
        assert len(table.routes[0].rules) == len(rules)
        return
    later, earlier = shadow
    assert problems_of(config) == [
        f"policies/p.yaml:{4 + later}: routes.orders.rules[{later}]: rule shadowed by the rule at "
        f"policies/p.yaml:{4 + earlier} (it covers all its methods and paths)"
    ]


# --- warnings ---------------------------------------------------------------------------------


def test_unreachable_globs_are_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ALL_RULES.replace(
        '      - paths: ["/orders/**"]\n',
        '      - paths: ["/billing/**"]\n        require: x\n'
        '      - paths: ["/orders/special/*"]\n        require: x\n'
        '      - paths: ["/orders/**"]\n',
    )
    table = load_route_table(config_with(tmp_path, monkeypatch, {"p.yaml": text}))
    assert table.warnings == (
        "policies/p.yaml:4: routes.orders.rules[0]: '/billing/**' can never match: route 'orders' "
        "only receives "
        "paths under '/orders'",
        "policies/p.yaml:6: routes.orders.rules[1]: '/orders/special/*' can never match: those paths "
        "go to route "
        "'special' (prefix '/orders/special')",
    )


# --- shipped policies -------------------------------------------------------------------------


def test_shipped_config_and_policies_load() -> None:
    table = load_route_table(load_config(REPO / "gateway.yaml", env={}))
    assert table.warnings == ()
    assert {
        "service-user-project-admin",
        "echo-reader",
        "echo-writer",
        "orders-reader",
        "orders-writer",
        "browser-app",
    } <= table.role_names()
    assert table.roles["service-user-project-admin"].permissions == ("*",)
    assert table.allows(("service-user-project-admin",), "orders:write")
    assert table.granted(("echo-writer",)) == {"echo:read", "echo:write"}
    assert table.granted(("orders-writer",)) == {"orders:read", "orders:write"}

    def decide(method: str, path: str) -> str | None:
        route = table.route(path)
        assert route is not None
        found = route.first_match(method, path)
        if found is None:
            return None
        return "public" if found.public else found.require

    assert decide("GET", "/echo/x") == "echo:read"
    assert decide("HEAD", "/echo") == "echo:read"
    assert decide("DELETE", "/echo/x") == "echo:write"
    assert decide("OPTIONS", "/echo/x") is None
    assert decide("POST", "/orders/webhook") == "public"
    assert decide("GET", "/orders/webhook") == "orders:read"
    assert decide("POST", "/orders/1") == "orders:write"
    assert decide("DELETE", "/orders/1") is None
    assert decide("PATCH", "/browser/anything") == "browser:use"
    assert table.route("/elsewhere") is None
