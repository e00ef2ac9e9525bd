"""The task registry: names -> Python callables, and the @register_task decorator.

A task is a function, `def` or `async def`, taking either no argument (the
prototype's shape) or one: a TaskContext. It returns a TaskResult.

`register_task` fills the process-wide default registry, the one that task
modules (`--task-modules`) use. Servers and tests build their own TaskRegistry
(see TaskRegistry.with_builtins) and copy the default one in, so no test shares
registrations with another.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flowsvc.errors import TaskRegistrationError
from flowsvc.models import END, clean_text, has_lone_surrogate
from flowsvc.references import INPUT

F = TypeVar("F", bound=Callable[..., Any])

#: A task's own check of its params before a flow runs (what a JSON Schema cannot say:
#: ranges of list items, params that exclude each other). It gets every param the flow
#: gives the task (flowsvc.AT_RUN_TIME for one holding a reference) and yields
#: (param, problem) for each problem, "" naming the params as a whole. It must not change
#: anything: its verdict is kept with the prepared flow. A check that raises is logged
#: and skipped: the task then meets the params at run time.
ParamsCheck = Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task and what the engine needs to know to call it."""

    name: str
    fn: Callable[..., Any]  # returns TaskResult, or an awaitable of one
    description: str
    source: str
    is_async: bool
    takes_context: bool
    #: JSON Schema of the params (declared, or from keyword-only parameters); None: any.
    params_schema: Mapping[str, Any] | None = None
    #: Keyword-only parameters the engine fills from params (None: params are not passed).
    keyword_params: frozenset[str] | None = None
    #: The function takes **kwargs: every param is passed.
    takes_all_params: bool = False
    #: The task's own check of its params before a flow runs (see ParamsCheck).
    check: ParamsCheck | None = None
    #: Keyword params annotated `int`: a whole number arrives as a float (JSON over
    #: protobuf's Struct), and the engine passes it as an int.
    int_params: frozenset[str] = frozenset()


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _json_type(annotation: Any) -> list[str] | str | None:
    """The JSON Schema type of an annotation, None when it says nothing we can check."""
    if annotation in _JSON_TYPES:
        return _JSON_TYPES[annotation]
    origin = typing.get_origin(annotation)
    if origin in (dict, list) or origin in (Mapping, Sequence):
        return "object" if origin in (dict, Mapping) else "array"
    if origin in (typing.Union, types.UnionType):
        members = [_json_type(a) for a in typing.get_args(annotation)]
        if all(isinstance(m, str) for m in members):
            return [m for m in members if isinstance(m, str)]
    return None


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, resolved; one that cannot be (a name imported only
    under TYPE_CHECKING, with `from __future__ import annotations`) is left out alone,
    not with every other: `n: int` still says integer, and still gets an int."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: S110  (resolved one by one below)
        pass
    namespace = getattr(inspect.unwrap(fn), "__globals__", None)
    hints: dict[str, Any] = {}
    for name, annotation in getattr(fn, "__annotations__", {}).items():
        single = types.SimpleNamespace(__annotations__={name: annotation})
        try:
            hints.update(typing.get_type_hints(single, globalns=namespace))
        except Exception:  # noqa: S112  (unresolvable: it says nothing we can check)
            continue
    return hints


def _schema_from_signature(fn: Callable[..., Any], signature: inspect.Signature) -> dict[str, Any]:
    hints = _type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in signature.parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        prop: dict[str, Any] = {}
        json_type = _json_type(hints.get(p.name))
        if json_type is not None:
            prop["type"] = json_type
        if p.default is p.empty:
            required.append(p.name)
        elif _json_problem(p.default, "") is None:  # ListTasks shows it as JSON
            prop["default"] = p.default
        properties[p.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        schema["additionalProperties"] = False
    return schema


def _json_problem(value: Any, path: str) -> str | None:
    """Where `value` stops being JSON that ListTasks can send (protobuf's Struct: str
    keys, text without lone surrogates, finite numbers within a double's range), None
    when it all is."""
    if isinstance(value, str):
        return f"{path or 'it'} holds a lone surrogate" if has_lone_surrogate(value) else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            if math.isfinite(float(value)):
                return None
        except OverflowError:
            pass
        return f"{path or 'it'} is {value!r:.40}, not a JSON number"
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path or 'it'} has a key that is not a string: {key!r:.40}"
            if has_lone_surrogate(key):
                return f"{path or 'it'} has a key with a lone surrogate: {key!r:.40}"
            problem = _json_problem(item, f"{path}.{key}" if path else key)
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{i}]")
            if problem:
                return problem
        return None
    return f"{path or 'it'} is a {type(value).__name__}, not JSON"


#: The JSON Schema type names a flow's params are checked against.
_JSON_TYPE_NAMES = frozenset(_JSON_TYPES.values())


def _schema_problem(schema: Any) -> str | None:
    """Where a declared params schema stops being one that flowsvc reads (an object;
    `properties` an object of objects, each `type` a JSON type name or a list of them,
    each `minimum` a number; `required` a list of names), None when it is. Only what
    the checks before a flow runs read (see validation._check_against_schema)."""
    if not isinstance(schema, Mapping):
        return f"it is a {type(schema).__name__}, not an object"
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return f"properties is a {type(properties).__name__}, not an object"
    for name, prop in properties.items():
        if not isinstance(prop, Mapping):
            return f"properties.{name} is a {type(prop).__name__}, not an object"
        json_type = prop.get("type")
        names = json_type if isinstance(json_type, list | tuple) else [json_type]
        # A dict or a list among them (a JSON Schema "type": {"anyOf": ...}) is no name,
        # and cannot be looked up in the set: TypeError, blamed on the task's module.
        if json_type is not None and not all(
            isinstance(t, str) and t in _JSON_TYPE_NAMES for t in names
        ):
            known = ", ".join(sorted(_JSON_TYPE_NAMES))
            return f"properties.{name}.type is {json_type!r:.60}, not one of {known} (or a list)"
        minimum = prop.get("minimum")
        if minimum is not None and (
            isinstance(minimum, bool) or not isinstance(minimum, int | float)
        ):
            return f"properties.{name}.minimum is {minimum!r:.60}, not a number"
    required = schema.get("required", [])
    if not isinstance(required, list | tuple) or not all(isinstance(n, str) for n in required):
        return f"required is {required!r:.60}, not a list of param names"
    return None


def _is_integer(json_type: Any) -> bool:
    """A schema type that says integer: "integer", or a list holding it (int | None)."""
    return json_type == "integer" or (isinstance(json_type, list) and "integer" in json_type)


def _name_problem(name: str) -> str | None:
    """Why no flow could run or refer to a task of this name (None: it can)."""
    if has_lone_surrogate(name):
        return "holds a lone surrogate, which no request or answer can carry"
    if name == END:
        return "is reserved: a route to it ends the flow"
    if name == INPUT:
        return "is reserved: ${input...} reads the flow's input"
    if name != name.strip():
        return "starts or ends with a space"
    for bad in (".", "}"):
        if bad in name:
            return f"holds {bad!r}, which would cut ${{{name}.data...}} short"
    if "${" in name:
        return f"holds '${{', which would nest a reference in ${{{name}.data...}}"
    return None


def _described(fn: Callable[..., Any]) -> Any:
    """What a task's description and source name: the function a functools.partial calls
    (a partial's own docstring and repr say nothing of the task, and its repr holds a
    memory address)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _source(fn: Callable[..., Any]) -> str:
    """`module:qualname` of the task's function, or of the class of a callable object."""
    fn = _described(fn)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or '?'}:{qualname}"


def _description(fn: Callable[..., Any]) -> str:
    """The task's docstring, as ListTasks shows it (a lone surrogate escaped: \\udc80)."""
    return clean_text(inspect.cleandoc(_described(fn).__doc__ or "").strip())


def _inspect(
    name: str,
    fn: Callable[..., Any],
    source: str | None,
    params_schema: Mapping[str, Any] | None = None,
    check: ParamsCheck | None = None,
) -> TaskSpec:
    if not callable(fn):
        raise TaskRegistrationError(f"task {name!r}: {fn!r} is not callable")
    if check is not None and not callable(check):
        raise TaskRegistrationError(f"task {name!r}: its check {check!r} is not callable")
    if inspect.iscoroutinefunction(check) or inspect.isasyncgenfunction(check):
        # Never awaited: it would be logged as failed, and skipped, for every flow.
        raise TaskRegistrationError(
            f"task {name!r}: its check {check!r} is async: a check is a plain def that "
            "returns or yields (param, problem) pairs"
        )
    if not name or not isinstance(name, str):
        raise TaskRegistrationError(f"task name must be a non-empty string, not {name!r}")
    problem = _name_problem(name)
    if problem:
        raise TaskRegistrationError(f"task name {name!r} {problem}: no flow could use it")
    if params_schema is not None:
        problem = _json_problem(params_schema, "")
        if problem:  # ListTasks could not send it, for any task
            raise TaskRegistrationError(f"task {name!r}: its params schema is not JSON: {problem}")
        problem = _schema_problem(params_schema)
        if problem:  # every flow using the task would fail to validate, or ListTasks to list
            raise TaskRegistrationError(
                f"task {name!r}: its params schema cannot be read: {problem}"
            )
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TaskRegistrationError(
            f"task {name!r}: {fn!r} is a generator function: called, it returns a "
            "generator, not a TaskResult (use def or async def, and return)"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TaskRegistrationError(f"task {name!r}: cannot read its signature: {exc}") from exc
    required = [
        p
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) > 1:
        raise TaskRegistrationError(
            f"task {name!r}: a task takes no argument or one (a TaskContext), "
            f"not {len(required)}: {signature}"
        )
    where = source or _source(fn)
    keyword = frozenset(p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY)
    takes_all = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    int_params: frozenset[str] = frozenset()
    if params_schema is None and (keyword or takes_all):
        params_schema = _schema_from_signature(fn, signature)
        int_params = frozenset(
            name
            for name, prop in params_schema["properties"].items()
            if _is_integer(prop.get("type"))
        )
    elif params_schema is None and not required:
        # Neither a context nor keyword params: no param could reach it, so a flow that
        # gives it some is told so rather than have them dropped.
        params_schema = {"type": "object", "properties": {}, "additionalProperties": False}
    return TaskSpec(
        name=name,
        fn=fn,
        description=_description(fn),
        source=where,
        is_async=inspect.iscoroutinefunction(fn),
        takes_context=len(required) == 1,
        params_schema=params_schema,
        keyword_params=keyword if (keyword or takes_all) else None,
        takes_all_params=takes_all,
        check=check,
        int_params=int_params,
    )


class TaskRegistry:
    """A mapping of task names to TaskSpecs. Registering a name twice is an error."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    @classmethod
    def with_builtins(cls) -> TaskRegistry:
        """A new registry holding the built-in tasks (task1..3, noop, fail, sleep, echo)."""
        from flowsvc.tasks import BUILTINS

        registry = cls()
        registry.merge(BUILTINS)
        return registry

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        source: str | None = None,
        params: Mapping[str, Any] | None = None,
        check: ParamsCheck | None = None,
    ) -> None:
        """Register `fn` under `name`; a clash names both sources.

        `params` is a JSON Schema of the params the task accepts (shown by ListTasks and
        checked before a flow runs); without it, the schema comes from the function's
        keyword-only parameters, which the engine then fills from the params. `check`
        checks the params further before a flow runs (see ParamsCheck).
        """
        self._add(_inspect(name, fn, source, params, check))

    def _add(self, spec: TaskSpec) -> None:
        existing = self._tasks.get(spec.name)
        if existing is not None:
            if existing.fn is spec.fn:
                return  # the same function again (e.g. a module imported twice)
            raise TaskRegistrationError(
                f"task {spec.name!r} is registered twice: by {existing.source} and by {spec.source}"
            )
        self._tasks[spec.name] = spec

    def task(
        self,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        check: ParamsCheck | None = None,
    ) -> Callable[[F], F]:
        """Decorator form of register()."""

        def decorate(fn: F) -> F:
            self.register(name, fn, params=params, check=check)
            return fn

        return decorate

    def merge(self, other: TaskRegistry) -> None:
        """Copy every task of `other` into this registry."""
        # Its spec as it is: registered again with its schema, a task whose schema came
        # from its signature would count as one declaring a schema (no int params).
        for spec in other:
            self._add(spec)

    def get(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(sorted(self._tasks.values(), key=lambda spec: spec.name))

    def __len__(self) -> int:
        return len(self._tasks)


#: Filled by @register_task in user task modules; copied into each server's registry.
default_registry = TaskRegistry()


def register_task(
    name: str, *, params: Mapping[str, Any] | None = None, check: ParamsCheck | None = None
) -> Callable[[F], F]:
    """Register a task in the default registry, as in the prototype::

    @register_task("my_new_task")
    def my_new_task() -> TaskResult:
        return TaskResult(status="success", data={"result": "value"})
    """
    return default_registry.task(name, params=params, check=check)
