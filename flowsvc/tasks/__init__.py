"""Built-in tasks, gathered in one registry that servers copy (TaskRegistry.with_builtins)."""

from flowsvc.tasks import http as _http  # noqa: F401  (registers `http` in BUILTINS)
from flowsvc.tasks.builtin import BUILTINS

__all__ = ["BUILTINS"]
