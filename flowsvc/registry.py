"""The task registry: names -> Python callables, and the @register_task decorator.

A task is a function, `def` or `async def`, taking either no argument (the
prototype's shape) or one: a TaskContext. It returns a TaskResult.

`register_task` fills the process-wide default registry, the one that task
modules (`--task-modules`) use. Servers and tests build their own TaskRegistry
(see TaskRegistry.with_builtins) and copy the default one in, so no test shares
registrations with another.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flowsvc.errors import TaskRegistrationError
from flowsvc.models import TaskContext

TaskFn = Callable[[], Any] | Callable[[TaskContext], Any]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task and what the engine needs to know to call it."""

    name: str
    fn: Callable[..., Any]  # returns TaskResult, or an awaitable of one
    description: str
    source: str
    is_async: bool
    takes_context: bool


def _inspect(name: str, fn: Callable[..., Any], source: str | None) -> TaskSpec:
    if not callable(fn):
        raise TaskRegistrationError(f"task {name!r}: {fn!r} is not callable")
    if not name or not isinstance(name, str):
        raise TaskRegistrationError(f"task name must be a non-empty string, not {name!r}")
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
    where = source or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    return TaskSpec(
        name=name,
        fn=fn,
        description=inspect.cleandoc(fn.__doc__ or "").strip(),
        source=where,
        is_async=inspect.iscoroutinefunction(fn),
        takes_context=len(required) == 1,
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

    def register(self, name: str, fn: Callable[..., Any], *, source: str | None = None) -> None:
        """Register `fn` under `name`; a clash names both sources."""
        spec = _inspect(name, fn, source)
        existing = self._tasks.get(name)
        if existing is not None:
            if existing.fn is fn:
                return  # the same function again (e.g. a module imported twice)
            raise TaskRegistrationError(
                f"task {name!r} is registered twice: by {existing.source} and by {spec.source}"
            )
        self._tasks[name] = spec

    def task(self, name: str) -> Callable[[F], F]:
        """Decorator form of register()."""

        def decorate(fn: F) -> F:
            self.register(name, fn)
            return fn

        return decorate

    def merge(self, other: TaskRegistry) -> None:
        """Copy every task of `other` into this registry."""
        for spec in other:
            self.register(spec.name, spec.fn, source=spec.source)

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


def register_task(name: str) -> Callable[[F], F]:
    """Register a task in the default registry, as in the prototype::

    @register_task("my_new_task")
    def my_new_task() -> TaskResult:
        return TaskResult(status="success", data={"result": "value"})
    """
    return default_registry.task(name)
