"""References in task params: "${input.customer_id}", "${task1.data.raw_data}".

    compile_params(params)  -> Template   once per flow (the engine's prepare)
    template.refs()         -> every Ref, with the path of the param holding it (validation)
    template.render(scope)  -> the params with references replaced (each attempt)

A string that is exactly one reference takes the referenced value with its JSON type; a
reference inside a longer string is replaced by its text (JSON for objects and lists).
"$${" is a literal "${". Roots: `input`, or a task's name followed by `data`, `status`
or `error` (or nothing: the whole result). Path segments are dict keys, or list indexes
written as numbers ("items.0"). A task name cannot contain a dot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

INPUT = "input"
RESULT_FIELDS = ("data", "status", "error")
#: Longest echo of a client's text in an error (errors travel in trailers and results).
MAX_ECHO = 64

#: "$${", or "${" and what follows up to its "}" (group 2 is None when there is none: a
#: match then runs to the end of the string, so a scan never starts again after an
#: unclosed "${", and a string of many of them costs one pass, not one per "${").
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)(\})?")


class _AtRunTime:
    """The value of a param that holds a reference, as a params check sees it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AT_RUN_TIME"


#: What a task's params check (TaskRegistry.register's `check`) gets for a param whose
#: value holds a reference: it is known only when the task runs.
AT_RUN_TIME: Any = _AtRunTime()


def clip(text: str) -> str:
    """`text`, cut to MAX_ECHO characters (with "..." when cut)."""
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


class ReferenceSyntaxError(ValueError):
    """A "${...}" that cannot be read. `where`: the path of the string holding it below
    the params, as Template.refs() writes it (".headers.Authorization", ".a[1]")."""

    where = ""


class MissingReferenceError(LookupError):
    """A reference whose value is not there at run time."""


class ParamsTooLargeError(ValueError):
    """Params that would grow past MAX_RENDERED once their references are replaced."""


#: The most one render of a task's params may make: characters of text with references
#: replaced, plus one per object entry or list item copied for a whole reference. A
#: reference may be repeated (a 100 KB input named 300 times is a 30 MB param), so
#: without a bound a request of a few MB could ask for gigabytes. 4 Mi is more than one
#: copy of the largest input (a 4 MiB request) or result (1 MiB) needs, and copying that
#: many values holds the event loop about a second.
MAX_RENDERED = 4 * 1024 * 1024


def _spend(room: list[int], cost: int) -> None:
    room[0] -= cost
    if room[0] < 0:
        raise ParamsTooLargeError(
            f"with their references replaced, the params would hold more than "
            f"{MAX_RENDERED:,} characters and copied values"
        )


@dataclass(frozen=True, slots=True)
class Ref:
    """One "${root.path...}"."""

    text: str  # as written, without ${ }
    root: str
    path: tuple[str, ...]


def parse_ref(body: str) -> Ref:
    if "${" in body:  # "${input.${input.key}}": no key is meant to start with "${"
        raise ReferenceSyntaxError(f"'${{{clip(body)}}}' holds a '${{': references do not nest")
    parts = body.strip().split(".")
    if not parts[0] or any(not p for p in parts):
        raise ReferenceSyntaxError(f"'${{{clip(body)}}}' is not a reference like ${{input.key}}")
    ref = Ref(body.strip(), parts[0], tuple(parts[1:]))
    if ref.root != INPUT and ref.path and ref.path[0] not in RESULT_FIELDS:
        raise ReferenceSyntaxError(
            f"'${{{clip(body)}}}': after a task name comes one of {', '.join(RESULT_FIELDS)}"
        )
    return ref


class _Text:
    """A string with references inside: rendered as text."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str | Ref]) -> None:
        self.parts = parts


class _Whole:
    """A string that is exactly one reference: rendered as the referenced value."""

    __slots__ = ("ref",)

    def __init__(self, ref: Ref) -> None:
        self.ref = ref


def _compile_string(value: str) -> str | _Text | _Whole:
    if "${" not in value:
        return value
    parts: list[str | Ref] = []
    pos = 0
    for match in _TOKEN.finditer(value):
        if match.start() > pos:
            parts.append(value[pos : match.start()])
        if match.group(0) == "$${":
            parts.append("${")
        elif match.group(2) is None:
            raise ReferenceSyntaxError(f"{clip(value)!r} has a '${{' without its closing '}}'")
        else:
            parts.append(parse_ref(match.group(1)))
        pos = match.end()
    rest = value[pos:]
    if rest:
        parts.append(rest)
    if len(parts) == 1 and isinstance(parts[0], Ref):
        return _Whole(parts[0])
    if not any(isinstance(p, Ref) for p in parts):
        return "".join(p for p in parts if isinstance(p, str))
    return _Text(parts)


def _compile(value: Any) -> Any:
    # No path is carried down: a path written for each value cost the length of its
    # keys again for every item below them (a 200 KB key over 20,000 items, a 480 KB
    # request, was 4 GB of text). A ReferenceSyntaxError gets its path on the way out.
    if isinstance(value, str):
        return _compile_string(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            try:
                out[k] = _compile(v)
            except ReferenceSyntaxError as exc:
                exc.where = f".{clip(k)}{exc.where}"
                raise
        return out
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for i, v in enumerate(value):
            try:
                items.append(_compile(v))
            except ReferenceSyntaxError as exc:
                exc.where = f"[{i}]{exc.where}"
                raise
        return items
    return value


#: Where a reference is below the params: object keys (str) and list indexes (int),
#: outermost first. Written out by `where` only when it is shown.
Where = tuple[str | int, ...]


def where(segments: Where) -> str:
    """`segments` as a path below the params (".headers.Authorization", ".a[1]"), each
    key cut to MAX_ECHO characters: a path names a field, and a key of megabytes would
    make each violation as large."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{clip(s)}" for s in segments)


def _walk_refs(value: Any, path: Where) -> Iterator[tuple[Where, Ref]]:
    if isinstance(value, _Whole):
        yield path, value.ref
    elif isinstance(value, _Text):
        for part in value.parts:
            if isinstance(part, Ref):
                yield path, part
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_refs(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_refs(v, (*path, i))


Lookup = Callable[[Ref], Any]


def _render(value: Any, lookup: Lookup, room: list[int]) -> Any:
    """`room`: what is left of MAX_RENDERED for this render (ParamsTooLargeError past it)."""
    if isinstance(value, _Whole):
        # A copy: a task changing an object it was given must not change the result
        # (or input) it came from, which is recorded and read by later references.
        return json_copy(lookup(value.ref), room)
    if isinstance(value, _Text):
        out = []
        for part in value.parts:
            text = as_text(lookup(part)) if isinstance(part, Ref) else part
            _spend(room, len(text))
            out.append(text)
        return "".join(out)
    if isinstance(value, dict):
        return {k: _render(v, lookup, room) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, lookup, room) for v in value]
    return value


def json_copy(value: Any, room: list[int] | None = None) -> Any:
    """A JSON value with every object and list in it new, as plain dicts and lists
    (read-only mappings and tuples too; scalars are immutable). `room`, when given, is
    spent one per entry or item copied (see _render)."""
    if isinstance(value, Mapping):
        if room is not None:
            _spend(room, len(value))
        return {k: json_copy(v, room) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if room is not None:
            _spend(room, len(value))
        return [json_copy(v, room) for v in value]
    return value


def _no_lookup(ref: Ref) -> Any:  # pragma: no cover - only called for a reference
    raise AssertionError(f"no reference to look up, yet asked for {ref.text}")


def as_text(value: Any) -> str:
    """A JSON value as text, as it was written: a string as it is, anything else as JSON
    with whole numbers written whole. Numbers arrive as floats (protobuf Struct), so a
    client's 42 would otherwise read "42.0" in "/customers/${input.id}"."""
    return value if isinstance(value, str) else json.dumps(whole_numbers(value))


def whole_numbers(value: Any) -> Any:
    """`value` with each float that holds an integer exactly (|x| <= 2**53) as an int."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, Mapping):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [whole_numbers(v) for v in value]
    return value


class Template:
    """A task's params, compiled: render() is cheap, and free when there is no reference."""

    __slots__ = ("_compiled", "_refs", "params", "renders")

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._compiled = _compile(params)
        self._refs = list(_walk_refs(self._compiled, ()))
        #: False: render() would return `params` as they are. True when a reference is
        #: to be resolved, or when a param holds an object or a list: each run then gets
        #: its own, so that a task changing one (`headers["X"] = ...`) changes nothing
        #: for the next run of this flow, which shares this Template.
        self.renders = bool(self._refs) or any(
            isinstance(value, dict | list) for value in self._compiled.values()
        )
        # What a task gets when there is no reference: the params with each "$${" read
        # as "${". Read-only: prepared flows are cached and shared by every execution of
        # the flow, so a task must not be able to change the params the next one gets.
        self.params: Mapping[str, Any] = MappingProxyType(
            dict(params) if self._refs else self._compiled
        )

    def refs(self) -> list[tuple[Where, Ref]]:
        """(where below params, as segments: see `where`, Ref) for every reference."""
        return self._refs

    def known(self) -> dict[str, Any]:
        """Each param as the task will get it, where that is known before it runs: one
        that is a whole reference is left out (its value, and type, come at run time),
        one with references inside text is text (its value given as "")."""
        return {
            name: "" if isinstance(value, _Text) else value
            for name, value in self._compiled.items()
            if not isinstance(value, _Whole)
        }

    def given(self) -> dict[str, Any]:
        """Every param, as the task will get it where no reference is in it, and
        AT_RUN_TIME where one is (anywhere inside it)."""
        return {
            name: AT_RUN_TIME if next(_walk_refs(value, ()), None) else value
            for name, value in self._compiled.items()
        }

    def render(self, lookup: Lookup) -> Mapping[str, Any]:
        """The params with references replaced: MissingReferenceError for one whose value
        is not there, ParamsTooLargeError past MAX_RENDERED."""
        if not self.renders:
            return self.params
        if not self._refs:  # no reference, but objects or lists: new ones, read-only atop
            return MappingProxyType(_render(self._compiled, _no_lookup, [MAX_RENDERED]))
        # Read-only atop too, though this dict is the run's own: ctx.params is then the same
        # whether or not the params hold a reference (a task that changed it worked in one
        # flow and failed in another).
        return MappingProxyType(_render(self._compiled, lookup, [MAX_RENDERED]))


def compile_params(params: Mapping[str, Any]) -> Template:
    """Raises ReferenceSyntaxError for a malformed "${...}"."""
    return Template(params)


def follow_path(value: Any, path: tuple[str, ...], ref: Ref, walked: tuple[str, ...] = ()) -> Any:
    """value[path[0]][path[1]]..., list indexes as numbers; MissingReferenceError if absent.
    `walked`: the segments of the reference already followed to reach `value`."""
    for depth, key in enumerate(path):
        where = clip(".".join((ref.root, *walked, *path[:depth])))
        text = clip(ref.text)
        if isinstance(value, Mapping):
            if key not in value:
                raise MissingReferenceError(f"${{{text}}}: {where} has no key {clip(key)!r}")
            value = value[key]
        elif isinstance(value, list):
            # ASCII digits only: str.isdigit() is also true for "²", which int() refuses.
            if not (key.isascii() and key.isdigit()) or int(key) >= len(value):
                raise MissingReferenceError(
                    f"${{{text}}}: {where} is a list of {len(value)}; no index {clip(key)!r}"
                )
            value = value[int(key)]
        else:
            raise MissingReferenceError(
                f"${{{text}}}: {where} is a {type(value).__name__}, not an object or list"
            )
    return value
