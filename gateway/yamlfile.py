"""Reading YAML for gateway.yaml and policies/: strict, line-aware, YAML 1.2 scalars.

Imports: errors, PyYAML.

Owns the one YAML loader of the gateway. PyYAML's ``safe_load`` has three traps
for a security product's config: it keeps the last of
two duplicate keys silently, it reads ``yes``/``no``/``on``/``off`` as booleans
(so ``strip_prefix: no`` or a role named ``on`` mean something else than
written), and it forgets where things were, so errors cannot say ``file:line``.
`load_yaml` fixes all three: duplicate keys are errors reported at the second
occurrence, scalars follow the YAML 1.2 core schema (only ``true``/``false`` are
booleans, no sexagesimal ints, no octal ``010``, no timestamps, no ``<<`` merge
keys), and mappings/sequences come back as `LineDict`/`LineList` that know the
1-based line of every key and item.

Mapping keys are always strings: the key's text as written (``1:`` gives the key
``"1"``), because every key of our files is a name.

`Validator` reads typed fields out of those containers (config.py and policy.py
share it) and collects "file:line: where: problem" lines rather than stopping at
the first, so `gateway check` shows everything that is wrong at once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "HTTP_TOKEN_RE",
    "LineDict",
    "LineList",
    "Validator",
    "describe",
    "display_path",
    "load_yaml",
    "load_yaml_mapping",
    "number_problem",
]


class LineDict(dict[str, object]):
    """A YAML mapping that remembers its own line and the line of each key and value."""

    __slots__ = ("line", "key_lines", "value_lines")

    def __init__(self, line: int = 1) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}
        self.value_lines: dict[str, int] = {}

    def line_of(self, key: str) -> int:
        """Line of `key` if present, else of the mapping itself (where a missing key belongs)."""
        return self.key_lines.get(key, self.line)


class LineList(list[object]):
    """A YAML sequence that remembers its own line and the line of each item."""

    __slots__ = ("line", "item_lines")

    def __init__(self, line: int = 1) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        """Line of item `index`."""
        return self.item_lines[index]


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema, no duplicate keys, and line-aware containers."""

    # Start from an empty resolver table instead of SafeLoader's YAML 1.1 one (which
    # resolves yes/no/on/off, 1:30, 010, dates and "<<"); add_implicit_resolver copies
    # per class, so SafeLoader itself is left untouched.
    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
# int before float: resolvers are tried in order and "12" matches both.
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_int(loader: StrictLoader, node: Node) -> int:
    assert isinstance(node, ScalarNode)
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)
    except ValueError:
        raise ConstructorError(None, None, f"invalid integer {text!r}", node.start_mark) from None


def _construct_mapping(loader: StrictLoader, node: Node) -> LineDict:
    if not isinstance(node, MappingNode):
        raise ConstructorError(None, None, "expected a mapping", node.start_mark)
    data = LineDict(_line(node))
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            raise ConstructorError(None, None, "a mapping key must be a plain name", key_node.start_mark)
        key = str(key_node.value)
        if key in data:
            # Reported at the second occurrence: that is the line a reader would
            # otherwise believe, and PyYAML would silently keep.
            raise ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined at line {data.key_lines[key]})",
                key_node.start_mark,
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = _line(key_node)
        data.value_lines[key] = _line(value_node)
    return data


def _construct_sequence(loader: StrictLoader, node: Node) -> LineList:
    if not isinstance(node, SequenceNode):
        raise ConstructorError(None, None, "expected a sequence", node.start_mark)
    data = LineList(_line(node))
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(_line(item))
    return data


StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
StrictLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def display_path(path: Path) -> str:
    """How a file is named in messages: relative to the current directory when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def describe(value: object) -> str:
    """A short YAML-ish name of a value's type, for "must be X, not Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _yaml_problem(display: str, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem = f"{problem} ({exc.context} at line {int(exc.context_mark.line) + 1})"
        return f"{display}:{line}: {problem}"
    return f"{display}: invalid YAML: {exc}"


def load_yaml(path: Path, display: str | None = None) -> object:
    """Parse one YAML file into LineDict/LineList/scalars; an empty file gives an empty LineDict.

    `display` is how the file is named in messages (default: `path` as given).
    Raises ConfigError("file:line: problem") for unreadable files and YAML errors.
    """
    name = str(path) if display is None else display
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError([f"{name}: is a directory, expected a YAML file"]) from None
    except FileNotFoundError:
        raise ConfigError([f"{name}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{name}:{line}: not valid UTF-8"]) from None
    loader = StrictLoader(text)
    try:
        # get_single_data refuses a stream of several documents: a second "---"
        # would otherwise be ignored silently.
        data: object = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(name, exc)]) from None
    finally:
        loader.dispose()
    if data is None:
        return LineDict(1)
    return data


def load_yaml_mapping(path: Path, display: str | None = None) -> LineDict:
    """`load_yaml` for files whose top level must be a mapping."""
    data = load_yaml(path, display)
    if not isinstance(data, LineDict):
        name = str(path) if display is None else display
        raise ConfigError([f"{name}:1: the file must be a mapping of keys, not {describe(data)}"])
    return data


# RFC 9110 token: header names and methods.
HTTP_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def number_problem(value: object, *, integer: bool = False, allow_zero: bool = False) -> str | None:
    """Why `value` is not a positive (or, with allow_zero, non-negative) number/integer; None if it is."""
    kind = "integer" if integer else "number"
    wanted = f"{'an' if integer else 'a'} {kind} ≥ 0" if allow_zero else f"a positive {kind}"
    # bool is an int subclass in Python; `true` is never a count.
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return f"must be {wanted}, not {describe(value)}"
    if value != value or value in (float("inf"), float("-inf")):
        return f"must be {wanted}, not {value}"
    if value < 0 or (value == 0 and not allow_zero):
        return f"must be {wanted}"
    return None


class Validator:
    """Typed reads of LineDict fields that collect "file:line: where: problem" lines instead of raising.

    Contract: callers read every field through one Validator per file, then raise
    ConfigError(validator.problems) if it is non-empty, so all problems show at once.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[str] = []

    def add(self, line: int, where: str, what: str) -> None:
        """Record a problem at `line`; `where` is the dotted field path ("" for none)."""
        prefix = f"{where}: " if where else ""
        self.problems.append(f"{self.file}:{line}: {prefix}{what}")

    def sorted_problems(self) -> list[str]:
        """The problems in line order (checks run field by field, readers read top-down)."""
        start = len(self.file) + 1

        def line(problem: str) -> int:
            text = problem[start:].split(":", 1)[0]
            return int(text) if text.isdigit() else 0

        return sorted(self.problems, key=line)

    def keys(self, node: LineDict, where: str, allowed: tuple[str, ...]) -> None:
        """Report every key of `node` not in `allowed` (a typo must not be ignored silently)."""
        for key in node:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
                self.add(node.key_lines[key], _join(where, key), f"unknown key; {hint}")

    def mapping(self, node: LineDict, key: str, where: str, allowed: tuple[str, ...] | None) -> LineDict:
        """The mapping at `key`, keys checked against `allowed` (None: any names); empty when absent/null."""
        value = node.get(key)
        if isinstance(value, LineDict):
            if allowed is not None:
                self.keys(value, _join(where, key), allowed)
            return value
        if value is not None:
            self.add(node.line_of(key), _join(where, key), f"must be a mapping, not {describe(value)}")
        return LineDict(node.line_of(key))

    def string(self, node: LineDict, key: str, where: str, *, required: bool = False) -> str | None:
        """The string at `key`; None when absent (a problem if `required`) or not a string."""
        if key not in node:
            if required:
                self.add(node.line, _join(where, key), "is required")
            return None
        value = node[key]
        if not isinstance(value, str):
            self.add(node.line_of(key), _join(where, key), f"must be a string, not {describe(value)}")
            return None
        return value

    def boolean(self, node: LineDict, key: str, where: str, default: bool) -> bool:
        """The boolean at `key`, or `default`; YAML 1.2: only true/false are booleans."""
        if key not in node:
            return default
        value = node[key]
        if not isinstance(value, bool):
            self.add(node.line_of(key), _join(where, key), f"must be true or false, not {value!r}")
            return default
        return value

    def number(
        self, node: LineDict, key: str, where: str, default: float, *, allow_zero: bool = False
    ) -> float:
        """The positive (or non-negative) number at `key`, or `default`."""
        if key not in node:
            return default
        value = node[key]
        problem = number_problem(value, allow_zero=allow_zero)
        if problem or not isinstance(value, int | float):
            self.add(node.line_of(key), _join(where, key), problem or "must be a number")
            return default
        return float(value)

    def integer(self, node: LineDict, key: str, where: str, default: int, *, allow_zero: bool = False) -> int:
        """The positive (or non-negative) integer at `key`, or `default`."""
        if key not in node:
            return default
        value = node[key]
        problem = number_problem(value, integer=True, allow_zero=allow_zero)
        if problem or not isinstance(value, int):
            self.add(node.line_of(key), _join(where, key), problem or "must be an integer")
            return default
        return value

    def items(self, node: LineDict, key: str, where: str) -> Iterator[tuple[object, int, str]]:
        """(item, line, "where.key[i]") for the list at `key`; nothing when absent or null."""
        value = node.get(key)
        if value is None:
            return
        if not isinstance(value, LineList):
            self.add(node.line_of(key), _join(where, key), f"must be a list, not {describe(value)}")
            return
        for index, item in enumerate(value):
            yield item, value.item_lines[index], f"{_join(where, key)}[{index}]"

    def strings(self, node: LineDict, key: str, where: str, convert: Callable[[str], T]) -> list[T]:
        """convert(item) for each string of the list at `key`; a ValueError's text becomes the problem."""
        converted: list[T] = []
        for item, line, path in self.items(node, key, where):
            try:
                if not isinstance(item, str):
                    raise ValueError(f"must be a string, not {describe(item)}")
                converted.append(convert(item))
            except ValueError as exc:
                self.add(line, path, str(exc))
        return converted
