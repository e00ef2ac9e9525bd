"""Built-in tasks, gathered in one registry that servers copy (TaskRegistry.with_builtins)."""

from flowsvc.tasks.builtin import BUILTINS

__all__ = ["BUILTINS"]
