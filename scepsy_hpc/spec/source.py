"""YAML loading that remembers the line of every value, and pydantic errors turned into SpecErrors.

Every user-facing input goes through `load_yaml`, so every error can name ``file:line``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec import limits

Loc = tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class SourceMap:
    """Where each value of a loaded YAML document came from (1-based lines, keyed by data path)."""

    path: str
    lines: dict[Loc, int] = field(default_factory=dict)
    key_lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc, *, key: bool = False) -> int | None:
        """Line of the value at `loc` (or of its key), falling back to the nearest enclosing value."""
        loc = tuple(loc)
        if key and loc in self.key_lines:
            return self.key_lines[loc]
        while True:
            if loc in self.lines:
                return self.lines[loc]
            if not loc:
                return None
            loc = loc[:-1]

    def where(self, loc: Loc, *, key: bool = False) -> str:
        """`file:line` for a data path."""
        line = self.line_of(loc, key=key)
        return f"{self.path}:{line}" if line else self.path


class _Loader(yaml.SafeLoader):
    """SafeLoader; documents are composed to nodes and converted by `_convert` to keep lines."""


@dataclass
class _Budget:
    """What converting one document may still cost: nodes visited (aliases expanded) and nesting."""

    nodes: int
    depth: int


def _construct(loader: _Loader, node: yaml.Node, smap: SourceMap) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except (ValueError, OverflowError, TypeError) as exc:  # int('9'*5000), a timestamp 2020-13-45
        raise SpecError(f"{smap.path}:{node.start_mark.line + 1}: cannot read the value {_clip(node)}: {exc}") from None


def _clip(node: yaml.Node) -> str:
    value = node.value if isinstance(node, yaml.ScalarNode) else "…"
    return repr(value if len(value) <= 40 else value[:40] + "…")


def _convert(loader: _Loader, node: yaml.Node, loc: Loc, smap: SourceMap, budget: _Budget, depth: int = 0) -> Any:
    budget.nodes -= 1
    if budget.nodes < 0:
        raise SpecError(f"{smap.path}:{node.start_mark.line + 1}: aliases expand to too many values; {limits.YAML_NODES.hint()}")
    if depth > budget.depth:
        raise SpecError(f"{smap.path}:{node.start_mark.line + 1}: nested too deeply (a recursive alias, or more than "
                        f"{budget.depth} levels); {limits.YAML_DEPTH.hint()}")
    smap.lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(f"{smap.path}:{key_node.start_mark.line + 1}: a mapping key must be a plain value, "
                                f"not a {'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
            key = _construct(loader, key_node, smap)
            if not isinstance(key, (str, int, float, bool)):
                raise SpecError(f"{smap.path}:{key_node.start_mark.line + 1}: a mapping key must be a plain value, got {key!r}")
            if key in out:
                raise SpecError(
                    f"{smap.path}:{key_node.start_mark.line + 1}: duplicate key {key!r} "
                    f"(first at line {smap.key_lines[loc + (key,)]}); remove one of them"
                )
            smap.key_lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _convert(loader, value_node, loc + (key,), smap, budget, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, loc + (i,), smap, budget, depth + 1) for i, item in enumerate(node.value)]
    return _construct(loader, node, smap)


def _expanded_size(node: yaml.Node, smap: SourceMap) -> int:
    """Values the node graph expands to once every alias is copied out (each shared node counted once per
    use, computed once): an alias bomb of 90 aliases standing for 10^9 values is refused before it grows."""
    cap = limits.YAML_NODES.value()
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            raise SpecError(f"{smap.path}:{n.start_mark.line + 1}: a recursive alias (an anchor used inside itself) "
                            f"cannot be expanded; copy the values instead")
        total = 1
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            open_.add(id(n))
            for child in n.value:
                for c in (child if isinstance(child, tuple) else (child,)):
                    total += size(c)
                    if total > cap:
                        raise SpecError(f"{smap.path}:{n.start_mark.line + 1}: aliases expand to more than {cap:,} values "
                                        f"(an alias bomb?); {limits.YAML_NODES.hint()}")
            open_.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def _check_events(text: str, path: str) -> None:
    """Refuse nesting and alias counts past their limits before anything is composed (PyYAML's
    composer recurses once per level: 20,000 levels would end in a RecursionError)."""
    max_depth, max_aliases = limits.YAML_DEPTH.value(), limits.YAML_ALIASES.value()
    depth = aliases = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > max_depth:
                raise SpecError(f"{path}:{event.start_mark.line + 1}: nested more than {max_depth} levels deep; "
                                f"{limits.YAML_DEPTH.hint()}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > max_aliases:
                raise SpecError(f"{path}:{event.start_mark.line + 1}: more than {max_aliases:,} aliases (*name); "
                                f"{limits.YAML_ALIASES.hint()}")


def _check_characters(text: str, path: str) -> None:
    """A NUL or other control character (tab, newline, carriage return excepted) is refused at its line."""
    m = _CONTROL.search(text)
    if m:
        line = text.count("\n", 0, m.start()) + 1
        col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
        raise SpecError(f"{path}:{line}: column {col}: control character {m.group()!r} is not allowed in a spec file; "
                        f"remove it (a binary file, or text pasted from a terminal?)")


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff\ud800-\udfff]")


def parse_yaml(text: str, path: str = "<string>") -> tuple[Any, SourceMap]:
    """Parse one YAML document within the limits of `spec.limits`; every error is a SpecError naming the line."""
    smap = SourceMap(path=path)
    _check_characters(text, path)
    loader = None
    try:
        _check_events(text, path)
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{path}: the file is empty; expected a YAML mapping")
        _expanded_size(node, smap)
        data = _convert(loader, node, (), smap, _Budget(limits.YAML_NODES.value(), limits.YAML_DEPTH.value()))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        opened = exc.context_mark
        if exc.context and opened is not None and mark is not None and opened.line != mark.line:
            problem += f" ({exc.context} at line {opened.line + 1})"
        raise SpecError(f"{path}{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        raise SpecError(f"{path}: YAML error: {exc.reason} (character {exc.character!r} at position {exc.position})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: YAML error: {exc}") from None
    except RecursionError:  # a limit raised far past what the interpreter's stack holds
        raise SpecError(f"{path}: nested too deeply for this interpreter; {limits.YAML_DEPTH.hint()}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, smap


def load_yaml(path: str | Path) -> tuple[Any, SourceMap]:
    """Read and parse a YAML file (at most `SCEPSY_MAX_FILE_BYTES`, UTF-8); any problem is a SpecError."""
    p = Path(path)
    cap = limits.FILE_BYTES.value()
    try:
        with p.open("rb") as f:  # read at most cap + 1 bytes: /dev/zero or a huge file costs nothing
            raw = f.read(cap + 1)
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL in the path
        raise SpecError(f"{p!r}: not a usable path: {exc}") from None
    if len(raw) > cap:
        raise SpecError(f"{p}: larger than {cap:,} bytes; {limits.FILE_BYTES.hint()}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(f"{p}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                        f"save the file as UTF-8") from None
    return parse_yaml(text, str(p))


def data_path(data: Any, loc: Iterable[Any]) -> Loc:
    """The longest reading of `loc` that navigates `data`, skipping pydantic's union/discriminator tags.

    A tag may equal a data key (the step tag 'call' and the key `call:`), so both readings are tried.
    """
    loc = tuple(loc)

    def best(cur: Any, i: int) -> Loc:
        if i == len(loc):
            return ()
        item = loc[i]
        skipped = best(cur, i + 1)
        navigable = (isinstance(cur, dict) and item in cur) or (
            isinstance(cur, list) and isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(cur)
        )
        if navigable:
            taken = (item,) + best(cur[item], i + 1)
            if len(taken) > len(skipped):
                return taken
        return skipped

    return best(data, 0)


def format_loc(loc: Loc) -> str:
    """`program[0].fanout.count` style path."""
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text or "(top level)"


def _get(data: Any, loc: Loc) -> Any:
    for item in loc:
        data = data[item]
    return data


def _mapping_path(data: Any, loc: Loc) -> Loc:
    """The data path of the mapping an error is about (a union tag such as 'call' is not one)."""
    path = data_path(data, loc)
    while path and not isinstance(_get(data, path), dict):
        path = path[:-1]
    return path


def _line_key(problem: str) -> tuple[str, int]:
    head = problem.split(": ", 1)[0]
    file, _, line = head.rpartition(":")
    return (file, int(line)) if line.isdigit() else (head, 0)


def validation_problems(exc: ValidationError, data: Any, smap: SourceMap) -> list[str]:
    """One `file:line: path: message` string per pydantic error."""
    problems: list[str] = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        ctx = err.get("ctx") or {}
        if err["type"] == "unknown_key":
            key_loc = _mapping_path(data, err["loc"]) + (ctx["key"],)
            problems.append(f"{smap.where(key_loc, key=True)}: {format_loc(key_loc)}: {msg}")
        elif err["type"] == "missing":
            loc = _mapping_path(data, err["loc"][:-1])
            problems.append(f"{smap.where(loc)}: {format_loc(loc)}: missing required key {err['loc'][-1]!r}")
        else:
            loc = data_path(data, err["loc"])
            text = f"{smap.where(loc)}: {format_loc(loc)}: {msg}"
            if err["type"] not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], (dict, list)):
                text += f" (got {err['input']!r})"
            problems.append(text)
    return problems


def _dict_paths(data: Any, loc: Loc, out: dict[int, Loc]) -> dict[int, Loc]:
    if isinstance(data, dict):
        out[id(data)] = loc
        for key, value in data.items():
            _dict_paths(value, loc + (key,), out)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _dict_paths(value, loc + (i,), out)
    return out


def validate(model: type[M], data: Any, smap: SourceMap) -> M:
    """Validate `data` into `model`; every problem (unknown keys included) becomes one line of a SpecError."""
    unknown: list[tuple[int, Any, str]] = []
    problems: list[str] = []
    result = None
    try:
        result = model.model_validate(data, context={"unknown_keys": unknown})
    except ValidationError as exc:
        problems = validation_problems(exc, data, smap)
    paths = _dict_paths(data, (), {})
    for ident, key, valid in unknown:
        if ident in paths:
            loc = paths[ident] + (key,)
            problems.append(f"{smap.where(loc, key=True)}: {format_loc(loc)}: unknown key {key!r}; valid keys here: {valid}")
    if problems:
        raise SpecError(sorted(dict.fromkeys(problems), key=_line_key))
    assert result is not None
    return result


def parse_document(model: type[M], data: Any, smap: SourceMap, shape: str,
                   check: "Callable[[M], list[str]] | None" = None) -> M:
    """Validate a whole document: it must be a mapping (`shape` says of what), then the model,
    then the cross-reference `check`; all problems of a stage are reported together."""
    if not isinstance(data, dict):
        raise SpecError(f"{smap.path}:1: {shape}")
    obj = validate(model, data, smap)
    problems = check(obj) if check else []
    if problems:
        raise SpecError(problems)
    return obj


def suggest(name: str, known: Iterable[str]) -> str:
    """`did you mean 'x'? known: a, b, c` for an unknown name."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listing = ", ".join(known) if len(known) <= 20 else ", ".join(known[:20]) + f", … ({len(known)} in all)"
    return f"{hint}known: {listing}"
