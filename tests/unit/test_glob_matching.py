"""Policy globs decide in linear time (security review, issue 9 item 2) and mean what they meant.

A glob with two or more `**` used to compile to a regex that backtracked polynomially: one
token-less request of 2 KB blocked the event loop for seconds. These tests feed the worst
shapes an 8 KB path, and compare the matcher with an obviously correct reference.
"""

from __future__ import annotations

import random
import re
import time
from functools import cache

import pytest

from gateway.config import RouteConfig
from gateway.policy import DSTAR, STAR, RoutePolicy, Rule, parse_glob

# aiohttp refuses a request line over 8190 bytes: "GET " + path + " HTTP/1.1".
MAX_PATH = 8190 - len("GET  HTTP/1.1")
BUDGET = 0.050  # seconds; the matcher needs about 1 ms for an 8 KB path, the old regex hours


def rule(*paths: str, methods: tuple[str, ...] | None = None) -> Rule:
    return Rule(frozenset(methods) if methods else None, paths, "x:y", False, "test:1")


def policy(*rules: Rule) -> RoutePolicy:
    return RoutePolicy(RouteConfig(name="r", prefix="/", upstream="http://h"), rules)


def reference(glob: str, path: str) -> bool:
    """Whether `path` matches `glob`, by the definition, token by token (memoised recursion)."""
    tokens = parse_glob(glob)
    if not path.startswith("/"):
        return path == "" and all(token == DSTAR for token in tokens)
    segments = path[1:].split("/")

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(tokens):
            return j == len(segments)
        if tokens[i] == DSTAR:  # ends here, or takes one more segment (any, even empty)
            return match(i + 1, j) or (j < len(segments) and match(i, j + 1))
        if j == len(segments):
            return False
        if tokens[i] == STAR:
            return segments[j] != "" and match(i + 1, j + 1)
        return tokens[i] == segments[j] and match(i + 1, j + 1)

    return match(0, 0)


def definition_regex(glob: str) -> str:
    """The regex globs were defined by before the matcher: fine for short paths only."""
    parts = {STAR: "/[^/]+", DSTAR: "(?:/[^/]*)*"}
    return "".join(parts.get(token, "/" + re.escape(token)) for token in parse_glob(glob))


def timed(call: object) -> float:
    assert callable(call)
    best = float("inf")
    for _ in range(3):  # the best of three: a loaded CI machine may pause any one of them
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def deep_path(head: str, segment: str, count: int) -> str:
    """`head` then `count` times "/segment", cut at a segment boundary to fit a request line."""
    path = head + ("/" + segment) * count
    return path if len(path) <= MAX_PATH else path[: path.rindex("/", 0, MAX_PATH + 1)]


# --- adversarial paths ------------------------------------------------------------------------

# (glob, head, segment, matches): the path head + "/segment" * n almost matches, so a
# backtracking matcher tries every way to split it between the "**".
WORST_SHAPES = [
    ("/repos/**/a/**/a/**/config", "/repos", "a", False),
    ("/**/a/**/a/**/a/**/b", "", "a", False),
    ("/**/*/**/*/**/*/**/x", "", "a", False),
    ("/**/a/*/**/a/*/**/z", "", "a", False),
    ("/x/**/**/**/**/y", "/x", "a", False),  # consecutive "**": nested stars in a regex
    ("/**/a/**/", "", "a", False),
    ("/**/" + "/".join(["*"] * 20) + "/x", "", "a", False),  # one "**": linear, × the tokens after it
    ("/a/**/a/a/a/a/a/a/a/a/b", "/a", "a", False),
    ("/**/*", "", "abcdefgh", True),
    ("/**/a/**/a/**/a", "", "a", True),
]


@pytest.mark.parametrize(
    ("glob", "head", "segment", "expected"), WORST_SHAPES, ids=[shape[0] for shape in WORST_SHAPES]
)
def test_adversarial_paths_decide_fast(glob: str, head: str, segment: str, expected: bool) -> None:
    # Doubling sizes up to 8 KB: a polynomial matcher fails its budget at a small size
    # (in well under a second) rather than hanging the test run for hours at 8 KB.
    r = rule(glob)
    p = policy(r, rule("/nothing/**"))
    count = 32
    while True:
        path = deep_path(head, segment, count)
        if count == 32:
            assert reference(glob, path) is expected
        elapsed = timed(lambda path=path: r.matches("GET", path))
        assert elapsed < BUDGET, f"{glob!r} took {elapsed * 1000:.0f} ms on a path of {len(path)} bytes"
        assert r.matches("GET", path) is expected
        elapsed = timed(lambda path=path: p.first_match("GET", path))
        assert elapsed < BUDGET, f"{glob!r} took {elapsed * 1000:.0f} ms in first_match, {len(path)} bytes"
        assert (p.first_match("GET", path) is r) is expected
        if len(path) >= MAX_PATH - len(segment) - 1:
            break
        count *= 2
    assert len(path) > 8000


def test_adversarial_path_that_matches_at_the_very_end() -> None:
    glob = "/repos/**/a/**/a/**/config"
    path = deep_path("/repos", "a", 5000)
    path = path[: path.rindex("/", 0, MAX_PATH - len("/config"))] + "/config"
    assert len(path) <= MAX_PATH
    assert timed(lambda: rule(glob).matches("GET", path)) < BUDGET
    assert rule(glob).matches("GET", path)


# --- the same answers as the definition --------------------------------------------------------

SHORT_CASES = [
    ("/a/**/b/**/c", "/a/b/c", True),
    ("/a/**/b/**/c", "/a/x/b/y/z/c", True),
    ("/a/**/b/**/c", "/a/c", False),
    ("/a/**/b/**/c", "/a/b/c/", False),
    ("/a/**/b/**/c", "/a/b/b/c/c", True),
    ("/**/a/**", "/a", True),
    ("/**/a/**", "/x/a/", True),
    ("/**/a/**", "/x/y", False),
    ("/a/**/**/b", "/a/b", True),
    ("/a/**/**/b", "/a/x/y/b", True),
    ("/**/**", "/", True),
    ("/**/*/**", "/", False),
    ("/**/*/**", "/x", True),
    ("/a/**/b/**/", "/a/b/", True),
    ("/a/**/b/**/", "/a/b", False),
    ("/**/a/**/b", "/a/b/a/b", True),
    ("/**/a/**/b", "/b/a", False),
    ("/**/a/**/b", "/A/b", False),  # case-sensitive
    ("/**/a/**/b", "a/b", False),  # not a path
    ("/**/**", "", True),  # not a path either, but the regex definition said so
    ("/*/**/*/**", "/x/y", True),
    ("/*/**/*/**", "/x/", False),
]


@pytest.mark.parametrize(("glob", "path", "expected"), SHORT_CASES)
def test_globs_with_several_double_stars(glob: str, path: str, expected: bool) -> None:
    assert reference(glob, path) is expected
    assert (re.fullmatch(definition_regex(glob), path) is not None) is expected
    assert rule(glob).matches("GET", path) is expected
    assert (policy(rule(glob)).first_match("GET", path) is not None) is expected


LITERALS = ["a", "b", "ab"]


def random_glob(rng: random.Random) -> str:
    tokens = [rng.choice([*LITERALS, STAR, STAR, DSTAR, DSTAR]) for _ in range(rng.randint(0, 6))]
    if rng.random() < 0.15:
        tokens.append("")  # a trailing "/"
    return "/" + "/".join(tokens)


def random_path(rng: random.Random, glob: str) -> str:
    """A path near `glob`: an instance of it (so about half match), then perhaps changed."""
    segments: list[str] = []
    for token in parse_glob(glob):
        if token == DSTAR:
            segments.extend(rng.choice([*LITERALS, "c", ""]) for _ in range(rng.choice([0, 0, 1, 2, 3])))
        elif token == STAR:
            segments.append(rng.choice([*LITERALS, "c", "xyz"]))
        else:
            segments.append(token)
    change = rng.random()
    if change < 0.15 and segments:
        del segments[rng.randrange(len(segments))]
    elif change < 0.3:
        segments.insert(rng.randint(0, len(segments)), rng.choice([*LITERALS, "c"]))
    elif change < 0.4:
        segments.append("")  # a trailing "/"
    elif change < 0.45 and segments:
        segments[rng.randrange(len(segments))] = ""  # "//": never canonical, still defined
    return "/" + "/".join(segments)


def test_reference_is_the_regex_definition() -> None:
    # The reference is what the old regex meant, on paths short enough for the regex.
    rng = random.Random(9)
    for _ in range(3000):
        glob = random_glob(rng)
        pattern = re.compile(definition_regex(glob))
        for _ in range(5):
            path = random_path(rng, glob)
            assert reference(glob, path) is (pattern.fullmatch(path) is not None), (glob, path)


def test_matcher_agrees_with_the_reference() -> None:
    rng = random.Random(2)
    matched = 0
    for _ in range(6000):
        glob = random_glob(rng)
        r = rule(glob)
        for _ in range(6):
            path = random_path(rng, glob)
            expected = reference(glob, path)
            matched += expected
            assert r.matches("GET", path) is expected, (glob, path)
    assert 8000 < matched < 28000  # both answers were asked often


def test_rules_with_several_globs_and_first_match_agree_with_the_reference() -> None:
    rng = random.Random(3)
    for _ in range(1500):
        rules = [
            rule(*(random_glob(rng) for _ in range(rng.randint(1, 3))), methods=rng.choice([None, ("GET",)]))
            for _ in range(rng.randint(1, 4))
        ]
        p = policy(*rules)
        for _ in range(8):
            path = random_path(rng, rng.choice([g for r in rules for g in r.paths]))
            method = rng.choice(["GET", "POST"])
            matching = [
                r
                for r in rules
                if (r.methods is None or method in r.methods) and any(reference(g, path) for g in r.paths)
            ]
            for r in rules:
                assert r.matches(method, path) is (r in matching), (r.paths, method, path)
            assert p.first_match(method, path) is (matching[0] if matching else None), (method, path)
