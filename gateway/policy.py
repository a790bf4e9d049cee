"""policies/*.yaml → RouteTable: roles, per-route rules, route lookup and permission checks.

Imports: config, errors, yamlfile. Reads YAML only in `load_route_table`; everything
else is pure and runs on every request, so lookups are precomputed at load time.

Owns the policy language (README "Policies reference"): roles (permissions plus `includes`),
ordered rules per route (first match decides), path globs on the canonical path
(``*`` = one whole segment, ``**`` = any depth including none), and permission
wildcards (``*``, ``orders:*``). A glob decides in time linear in the path, whatever its
shape: no backtracking regex sees a glob with two or more ``**`` (see `_GlobNfa`), since
rules are tested before authentication. Loading refuses, with every problem as
"file:line: what is wrong", anything that would make the table mean something else
than it says: undefined roles or routes, include cycles, duplicates, bad globs,
and rules shadowed by an earlier rule (they could never decide anything). Globs that
no request of their route can reach are `RouteTable.warnings`, not errors.
A RouteTable is immutable; a reload builds a new one and swaps the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from itertools import islice
from pathlib import Path
from types import MappingProxyType

from gateway.config import NAME_RE, Config, RouteConfig
from gateway.errors import ConfigError
from gateway.yamlfile import HTTP_TOKEN_RE, LineDict, Validator, display_path, load_yaml_mapping

__all__ = ["Role", "Rule", "RoutePolicy", "RouteTable", "load_route_table", "parse_glob", "glob_covers"]

STAR, DSTAR = "*", "**"  # glob tokens; a literal segment can never contain "*"
PERMISSION_RE = re.compile(r"^(?:\*|[A-Za-z0-9._-]+(?::[A-Za-z0-9._-]+)*(?::\*)?)$")
_GRANTED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Role:
    """A named bundle of permissions from policies/ (`includes` not expanded here)."""

    name: str
    description: str | None
    permissions: tuple[str, ...]
    includes: tuple[str, ...]  # other roles whose permissions this one also grants
    source: str  # "file:line"


def parse_glob(glob: str) -> tuple[str, ...]:
    """Split a path glob into segment tokens (literal, STAR, DSTAR); ValueError(why) if it is bad."""
    if not glob.startswith("/"):
        raise ValueError("must start with '/'")
    segments = tuple(glob[1:].split("/"))
    for index, segment in enumerate(segments):
        if segment == "" and index != len(segments) - 1:
            raise ValueError("must not contain an empty segment ('//'): canonical paths have none")
        if segment in (".", ".."):
            raise ValueError("must not contain '.' or '..' segments: canonical paths have none")
        if "*" in segment and segment not in (STAR, DSTAR):
            raise ValueError(f"'*' must be a whole segment ('*' or '**'), not part of {segment!r}")
        if any(ch in "%?#;\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in segment):
            raise ValueError(
                "must not contain '%', '?', '#', ';', '\\' or control characters "
                "(globs match the decoded path, without the query)"
            )
    return segments


def _collapse(tokens: tuple[str, ...]) -> tuple[str, ...]:
    # "**/**" means what "**" means; as a regex it would nest two stars (polynomial backtracking).
    return tuple(t for i, t in enumerate(tokens) if not (t == DSTAR and i > 0 and tokens[i - 1] == DSTAR))


def _glob_regex(tokens: tuple[str, ...]) -> str:
    # Only for globs with at most one "**" (the others go to `_GlobNfa`): a failing match then
    # backtracks over that one star alone, O(len(path) × tokens after it); each further "**"
    # would multiply by len(path) again (seconds of event loop for a 2 KB path).
    parts = []
    for token in tokens:
        if token == DSTAR:
            parts.append("(?:/[^/]*)*")  # any number of segments, so "/a/**" also matches "/a"
        elif token == STAR:
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(token))
    return "".join(parts)


class _GlobNfa:
    """A glob with two or more "**", run over the path's segments in one pass: O(segments).

    A regex would backtrack polynomially in the path length (one factor per "**"); here the
    set of glob positions still alive is a bit set, and "**" is a position that stays alive
    on any segment and also lets the next position start (an epsilon move).
    """

    __slots__ = ("_accepts", "_star", "_dstar", "_start", "_accept")

    def __init__(self, tokens: tuple[str, ...]) -> None:
        star = dstar = 0
        literal: dict[str, int] = {"": 0}  # "" is never a "*" segment, so it needs its own entry
        for index, token in enumerate(tokens):
            bit = 1 << index
            if token == DSTAR:
                dstar |= bit
            elif token == STAR:
                star |= bit
            else:
                literal[token] = literal.get(token, 0) | bit
        # Segment text → the positions that step over it; any other segment: the "*" positions.
        self._accepts = {text: bits | (star if text else 0) for text, bits in literal.items()}
        self._star, self._dstar = star, dstar
        self._start = 1 | (1 & dstar) << 1
        self._accept = 1 << len(tokens)

    def match(self, segments: list[str]) -> bool:
        """Whether `path.split("/")` matches: segments[0] is the "" before the leading "/"."""
        if segments[0]:
            return False
        accepts, star, dstar = self._accepts.get, self._star, self._dstar
        state = self._start
        for segment in islice(segments, 1, None):
            state = (state & accepts(segment, star)) << 1 | state & dstar
            # One epsilon step suffices: tokens are collapsed, so no "**" follows a "**".
            state |= (state & dstar) << 1
            if not state:
                return False
        return state & self._accept != 0


def _never(path: str) -> bool:
    """The text test of a rule whose globs all need `_GlobNfa`."""
    return False


def _text_matcher(globs: list[tuple[str, ...]]) -> Callable[[str], object]:
    """A fast test on the path string for globs with at most one "**": truthy if one matches."""
    if not globs:
        return _never
    if len(globs) == 1 and globs[0][-1:] == (DSTAR,) and all(t not in (STAR, DSTAR) for t in globs[0][:-1]):
        # "/orders/**", the most common shape: a prefix check on a segment boundary beats the regex.
        exact = "".join("/" + token for token in globs[0][:-1])
        below = exact + "/"
        return lambda path: path.startswith(below) or path == exact
    if len(globs) == 1 and all(t not in (STAR, DSTAR) for t in globs[0]):
        return ("".join("/" + token for token in globs[0])).__eq__
    return re.compile("|".join(f"(?:{_glob_regex(tokens)})" for tokens in globs)).fullmatch


def glob_covers(wide: tuple[str, ...], narrow: tuple[str, ...]) -> bool:
    """True only if every canonical path `narrow` matches is matched by `wide` (sound, may say False)."""

    @cache
    def covers(i: int, j: int) -> bool:
        if j == len(narrow):
            return all(token == DSTAR for token in wide[i:])
        if i == len(wide):
            return False
        a, b = wide[i], narrow[j]
        if a == DSTAR:
            # wide's ** either ends here or swallows narrow's next token (a segment, or a
            # whole ** of narrow: then any segments narrow produces there are swallowed too).
            return covers(i + 1, j) or covers(i, j + 1)
        if b == DSTAR:
            # narrow's ** yields nothing here, or a non-empty segment that wide's single
            # token must match whatever it is: only STAR can.
            return a == STAR and covers(i, j + 1) and covers(i + 1, j)
        if a == STAR:
            return b != "" and covers(i + 1, j + 1)
        return a == b and covers(i + 1, j + 1)

    return covers(0, 0)


def _globs_intersect(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True if some path matches both globs."""

    @cache
    def meet(i: int, j: int) -> bool:
        if i == len(a) or j == len(b):
            return all(token == DSTAR for token in a[i:] + b[j:])
        x, y = a[i], b[j]
        if x == DSTAR:
            return meet(i + 1, j) or meet(i, j + 1)
        if y == DSTAR:
            return meet(i, j + 1) or meet(i + 1, j)
        if STAR in (x, y):
            return x != "" and y != "" and meet(i + 1, j + 1)
        return x == y and meet(i + 1, j + 1)

    return meet(0, 0)


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a route: methods × path globs → a required permission, or public."""

    methods: frozenset[str] | None  # None = any method; upper-case
    paths: tuple[str, ...]  # globs as written
    require: str | None  # the permission; None when public
    public: bool  # no token needed; identity headers are removed, never set
    source: str  # "file:line"
    _text: Callable[[str], object] = field(init=False, repr=False, compare=False)  # globs with ≤ 1 "**"
    _deep: tuple[_GlobNfa, ...] = field(init=False, repr=False, compare=False)  # the others

    def __post_init__(self) -> None:
        parsed = [_collapse(parse_glob(glob)) for glob in self.paths]
        object.__setattr__(self, "_text", _text_matcher([t for t in parsed if t.count(DSTAR) <= 1]))
        object.__setattr__(self, "_deep", tuple(_GlobNfa(t) for t in parsed if t.count(DSTAR) > 1))

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to `method` and the canonical `path`."""
        if self.methods is not None and method not in self.methods:
            return False
        if self._text(path):
            return True
        segments = path.split("/") if self._deep else []
        return any(nfa.match(segments) for nfa in self._deep)


_Step = tuple[Callable[[str], object], Rule]


def _step(rule: Rule) -> _Step:
    """The rule with one callable that tells whether a path matches any of its globs."""
    text, deep = rule._text, rule._deep
    if not deep:
        return text, rule
    if text is _never and len(deep) == 1:
        only = deep[0].match
        return (lambda path: only(path.split("/"))), rule

    def match(path: str) -> bool:
        if text(path):
            return True
        # Split here, not for every request: only a glob with several "**" needs the segments,
        # and the split (C, ~30 µs for 4,000 segments) is small beside the walk (~300 µs).
        segments = path.split("/")
        return any(nfa.match(segments) for nfa in deep)

    return match, rule


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """A route of gateway.yaml with its ordered rules."""

    config: RouteConfig
    rules: tuple[Rule, ...]
    _by_method: dict[str, tuple[_Step, ...]] = field(init=False, repr=False, compare=False)
    _any_method: tuple[_Step, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Per-method rule lists, so a request only tests the patterns that could apply, each
        # rule paired with one ready matcher: this loop runs on every request.
        steps = [_step(rule) for rule in self.rules]
        methods = {method for rule in self.rules for method in rule.methods or ()}
        by_method = {m: tuple(s for s in steps if s[1].methods is None or m in s[1].methods) for m in methods}
        object.__setattr__(self, "_by_method", by_method)
        object.__setattr__(self, "_any_method", tuple(s for s in steps if s[1].methods is None))

    def first_match(self, method: str, path: str) -> Rule | None:
        """The first rule matching `method` and canonical `path`; None means refuse (403)."""
        for text, rule in self._by_method.get(method, self._any_method):
            if text(path):
                return rule
        return None


class RouteTable:
    """Routes and roles of one configuration; immutable, swapped whole on reload."""

    __slots__ = (
        "roles",
        "routes",
        "warnings",
        "_by_prefix",
        "_depth",
        "_expanded",
        "_granted",
        "_reach",
        "_carried",
    )

    def __init__(
        self, roles: Mapping[str, Role], routes: Iterable[RoutePolicy], warnings: Iterable[str] = ()
    ) -> None:
        self.roles: Mapping[str, Role] = MappingProxyType(dict(roles))
        self.routes: tuple[RoutePolicy, ...] = tuple(routes)  # config order
        self.warnings: tuple[str, ...] = tuple(warnings)  # "file:line: ..." worth showing, not fatal
        self._by_prefix = {route.config.prefix: route for route in self.routes}
        # Segments in the deepest prefix ("/" has none): deeper segments of a path never matter.
        self._depth = max((p.count("/") for p in self._by_prefix if p != "/"), default=0)
        self._expanded = {name: self._expand(name) for name in self.roles}
        self._granted: dict[tuple[str, ...], frozenset[str]] = {}
        self._reach = {name: self._closure(name) for name in self.roles}
        self._carried: dict[tuple[tuple[str, ...] | None, tuple[str, ...]], tuple[str, ...]] = {}

    def _closure(self, name: str) -> frozenset[str]:
        seen, stack = {name}, [name]
        while stack:
            role = self.roles.get(stack.pop())
            new = [include for include in role.includes if include not in seen] if role else []
            seen.update(new)
            stack.extend(new)
        return frozenset(seen)

    def _expand(self, name: str) -> frozenset[str]:
        # Iterative and cycle-safe (cycles are refused at load anyway).
        seen = self._closure(name)
        return frozenset(p for role in seen if role in self.roles for p in self.roles[role].permissions)

    def reachable(self, roles: Iterable[str]) -> frozenset[str]:
        """The role names held in `roles` plus every role they reach through `includes`."""
        found: set[str] = set()
        for name in roles:
            found.add(name)
            found.update(self._reach.get(name, ()))
        return frozenset(found)

    def carried(self, token_roles: tuple[str, ...] | None, user_roles: tuple[str, ...]) -> tuple[str, ...]:
        """The roles a token carries now, sorted (README "Command line"): its own list, if it has one,
        intersected with the roles its user holds or reaches now; else the user's roles."""
        if token_roles is None:
            return user_roles  # the common case: sorted by the store already
        key = (token_roles, user_roles)
        found = self._carried.get(key)
        if found is None:
            found = tuple(sorted(self.reachable(user_roles).intersection(token_roles)))
            if len(self._carried) >= _GRANTED_CACHE_SIZE:
                self._carried.clear()  # bounded, as `granted`
            self._carried[key] = found
        return found

    def route(self, path: str) -> RoutePolicy | None:
        """The route with the longest prefix of `path` on a segment boundary ("/" matches all)."""
        # Cut the path after its first `_depth` segments: no prefix is deeper, and each step
        # below slices and hashes, so a path of 4,000 segments cost 4 ms uncut.
        parts = path.split("/", self._depth + 1)
        candidate = path if len(parts) <= self._depth + 1 else path[: len(path) - len(parts[-1]) - 1]
        while candidate:
            found = self._by_prefix.get(candidate)
            if found is not None:
                return found
            candidate = candidate[: candidate.rfind("/")]
        return self._by_prefix.get("/")

    def granted(self, roles: tuple[str, ...]) -> frozenset[str]:
        """All permissions the role names grant, includes followed; undefined names grant nothing."""
        found = self._granted.get(roles)
        if found is None:
            found = frozenset().union(*(self._expanded.get(name, frozenset()) for name in roles))
            if len(self._granted) >= _GRANTED_CACHE_SIZE:
                self._granted.clear()  # bounded: role combinations are few, junk must not grow it
            self._granted[roles] = found
        return found

    def allows(self, roles: tuple[str, ...], permission: str) -> bool:
        """Whether the roles grant `permission`: exactly, via "*", or via "prefix:*"."""
        granted = self.granted(roles)
        if permission in granted or "*" in granted:
            return True
        parts = permission.split(":")
        return any(":".join(parts[:index]) + ":*" in granted for index in range(1, len(parts)))

    def role_names(self) -> frozenset[str]:
        """Names of the roles policies/ defines."""
        return frozenset(self.roles)


def _policy_files(config: Config) -> list[Path]:
    path = config.policies_path
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError([f"{display_path(path)}: policies folder or file not found"])
    # Hidden files are editor locks and backups (.#10-routes.yaml), not policies.
    found = (p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))
    return sorted((p for p in found if p.is_file()), key=lambda p: p.name)


class _Loader:
    """State of one load_route_table call: what was defined where, and the problems found."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = {route.name: route for route in config.routes}
        self.roles: dict[str, Role] = {}
        self.include_lines: dict[str, list[tuple[str, Validator, int]]] = {}
        self.rules: dict[str, tuple[tuple[Rule, ...], str]] = {}  # route → (rules, "file:line")
        self.rule_count: dict[str, int] = {}  # route → rules written, valid or not
        self.validators: list[Validator] = []
        self.warnings: list[str] = []

    def read(self, path: Path) -> None:
        display = display_path(path)
        v = Validator(display)
        self.validators.append(v)
        try:
            root = load_yaml_mapping(path, display)
        except ConfigError as exc:
            v.problems.extend(exc.problems)
            return
        v.keys(root, "", ("roles", "routes"))
        roles = v.mapping(root, "roles", "", None)
        for name in roles:
            self.role(v, roles, name)
        routes = v.mapping(root, "routes", "", None)
        for name in routes:
            self.route_rules(v, routes, name)

    def role(self, v: Validator, roles: LineDict, name: str) -> None:
        line, where = roles.key_lines[name], f"roles.{name}"
        if not NAME_RE.match(name):
            v.add(line, where, f"role names must match {NAME_RE.pattern}")
        if name in self.roles:
            v.add(line, where, f"role {name!r} is already defined at {self.roles[name].source}")
            return
        body = LineDict(line) if roles[name] is None else roles[name]
        if not isinstance(body, LineDict):
            v.add(line, where, "must be a mapping with description, permissions and includes")
            return
        v.keys(body, where, ("description", "permissions", "includes"))
        permissions = v.strings(body, "permissions", where, _permission)
        includes: list[str] = []
        for item, item_line, path in v.items(body, "includes", where):
            if not isinstance(item, str):
                v.add(item_line, path, "must be a role name")
            else:
                includes.append(item)
                self.include_lines.setdefault(name, []).append((item, v, item_line))
        self.roles[name] = Role(
            name,
            v.string(body, "description", where),
            tuple(permissions),
            tuple(includes),
            f"{v.file}:{line}",
        )

    def route_rules(self, v: Validator, routes: LineDict, name: str) -> None:
        line, where = routes.key_lines[name], f"routes.{name}"
        route = self.routes.get(name)
        if route is None:
            v.add(line, where, f"route {name!r} is not defined in {self.config.path.name}")
        if name in self.rules:
            v.add(line, where, f"rules for route {name!r} are already given at {self.rules[name][1]}")
            return
        body = routes[name]
        if not isinstance(body, LineDict):
            v.add(line, where, "must be a mapping with `rules: [...]`")
            return
        v.keys(body, where, ("rules",))
        rules: list[Rule] = []
        for item, item_line, path in v.items(body, "rules", where):
            self.rule_count[name] = self.rule_count.get(name, 0) + 1
            rule = self.rule(v, item, item_line, path)
            if rule is None:
                continue
            for earlier in rules:
                if _shadows(earlier, rule):
                    v.add(
                        item_line,
                        path,
                        f"rule shadowed by the rule at {earlier.source} "
                        "(it covers all its methods and paths)",
                    )
                    break
            rules.append(rule)
            if route is not None:
                self.check_reachable(v, route, rule, item_line, path)
        self.rules[name] = (tuple(rules), f"{v.file}:{line}")

    def rule(self, v: Validator, item: object, line: int, where: str) -> Rule | None:
        if not isinstance(item, LineDict):
            v.add(line, where, "must be a mapping with methods, paths and require or public")
            return None
        before = len(v.problems)
        v.keys(item, where, ("methods", "paths", "require", "public"))
        methods = frozenset(v.strings(item, "methods", where, _method)) if "methods" in item else None
        if "methods" in item and not item["methods"]:
            v.add(item.line_of("methods"), f"{where}.methods", "must not be empty (omit it: any method)")
        paths = v.strings(item, "paths", where, _glob)
        if not item.get("paths"):
            v.add(item.line_of("paths"), f"{where}.paths", "is required: a non-empty list of path globs")
        require = v.string(item, "require", where)
        if require is not None and not PERMISSION_RE.match(require):
            v.add(item.line_of("require"), f"{where}.require", f"{require!r} is not a permission")
        elif require is not None and require.endswith("*"):
            v.add(item.line_of("require"), f"{where}.require", "must name one permission, not a wildcard")
        public = v.boolean(item, "public", where, False)
        if public and "require" in item:
            v.add(line, where, "give either `require: PERMISSION` or `public: true`, not both")
        elif not public and "require" not in item:
            v.add(line, where, "needs `require: PERMISSION` or `public: true`")
        if len(v.problems) != before:
            return None
        return Rule(methods, tuple(paths), require, public, f"{v.file}:{line}")

    def check_reachable(self, v: Validator, route: RouteConfig, rule: Rule, line: int, where: str) -> None:
        """Warn about globs no request of this route can match (a typo, or another route's paths)."""
        own = _prefix_tokens(route.prefix)
        for glob in rule.paths:
            tokens = parse_glob(glob)
            if not _globs_intersect(own, tokens):
                self.warnings.append(
                    f"{v.file}:{line}: {where}: {glob!r} can never match: route "
                    f"{route.name!r} only receives paths under {route.prefix!r}"
                )
                continue
            for other in self.config.routes:
                longer = other.prefix != route.prefix and (
                    route.prefix == "/" or other.prefix.startswith(route.prefix + "/")
                )
                if longer and glob_covers(_prefix_tokens(other.prefix), tokens):
                    self.warnings.append(
                        f"{v.file}:{line}: {where}: {glob!r} can never match: those paths "
                        f"go to route {other.name!r} (prefix {other.prefix!r})"
                    )
                    break

    def check_roles(self) -> None:
        for name, includes in self.include_lines.items():
            for include, v, line in includes:
                if include not in self.roles:
                    v.add(line, f"roles.{name}.includes", f"role {include!r} is not defined")
        # Cycle search: depth-first with colours; each back edge is one cycle, reported at
        # the include that closes it.
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        stack: list[str] = []

        def visit(name: str) -> None:
            state[name] = 1
            stack.append(name)
            for include, v, line in self.include_lines.get(name, ()):
                if state.get(include) == 1:
                    cycle = [*stack[stack.index(include) :], include]
                    v.add(line, f"roles.{name}.includes", f"include cycle: {' -> '.join(cycle)}")
                elif include in self.roles and include not in state:
                    visit(include)
            stack.pop()
            state[name] = 2

        for name in self.roles:
            if name not in state:
                visit(name)


def _permission(text: str) -> str:
    if not PERMISSION_RE.match(text):
        raise ValueError(
            f"{text!r} is not a permission (NAME[:PART...], '*' only as a whole last part "
            "like 'orders:*', or '*' alone)"
        )
    return text


def _method(text: str) -> str:
    if not HTTP_TOKEN_RE.match(text):
        raise ValueError(f"{text!r} is not an HTTP method")
    if text != text.upper():
        raise ValueError(f"methods are upper-case: write {text.upper()!r}")
    return text


def _glob(text: str) -> str:
    try:
        parse_glob(text)
    except ValueError as exc:
        raise ValueError(f"bad glob {text!r}: {exc}") from None
    return text


def _prefix_tokens(prefix: str) -> tuple[str, ...]:
    return (*(segment for segment in prefix.split("/") if segment), DSTAR)


def _shadows(earlier: Rule, later: Rule) -> bool:
    if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
        return False
    wide = [parse_glob(glob) for glob in earlier.paths]
    return all(any(glob_covers(w, parse_glob(glob)) for w in wide) for glob in later.paths)


def load_route_table(config: Config) -> RouteTable:
    """Read policies/ for `config`; raise ConfigError with every problem as "file:line: ..."."""
    loader = _Loader(config)
    files = _policy_files(config)
    for path in files:
        loader.read(path)
    loader.check_roles()
    problems = [p for v in loader.validators for p in v.sorted_problems()]
    if not files:
        problems.append(f"{display_path(config.policies_path)}: no *.yaml policy files in this folder")
    # A route without rules would refuse every request: almost surely a forgotten file.
    # (Rules that were written but are wrong were reported already.)
    for route in config.routes:
        if not loader.rule_count.get(route.name):
            problems.append(
                f"{route.source}: route {route.name!r} has no rules in policies/: "
                "every request would be refused"
            )
    if problems:
        raise ConfigError(problems)
    policies = (RoutePolicy(route, loader.rules[route.name][0]) for route in config.routes)
    return RouteTable(loader.roles, policies, loader.warnings)
