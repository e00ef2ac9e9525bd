"""ACME's onboarding tasks.

`acme_save_customer` is a plain `def`: it calls a blocking library (sqlite3), so flowsvc
runs it in a worker thread and the server goes on answering meanwhile.
`acme_welcome` is an `async def`: it runs on the event loop and must only await.

Both declare their params as keyword-only parameters: flowsvc passes the flow's params
(references already resolved) as those arguments, shows them in ListTasks, and rejects a
flow with an unknown or missing param before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

from flowsvc import TaskContext, TaskRegistry, TaskResult

registry = TaskRegistry()


@registry.task("acme_save_customer")
def save_customer(ctx: TaskContext, *, db_path: str, name: str, email: str) -> TaskResult:
    """Store a customer in ACME's customer database; data: {"customer_id": ...}."""
    if "@" not in email:
        # Retrying cannot fix a bad address: say so, and a retry policy will not repeat it.
        return TaskResult.failure(f"not an e-mail address: {email!r}", retryable=False)
    # closing(): a connection's own `with` commits (or rolls back) but does not close it.
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS customers "
            "(id INTEGER PRIMARY KEY, name TEXT, email TEXT, flow_id TEXT)"
        )
        cursor = db.execute(
            "INSERT INTO customers (name, email, flow_id) VALUES (?, ?, ?)",
            (name, email, ctx.flow_id),
        )
    return TaskResult.success({"customer_id": cursor.lastrowid})


@registry.task("acme_welcome")
async def welcome(*, customer_id: int, name: str, channel: str = "email") -> TaskResult:
    """Send the welcome message; data: {"message": ..., "channel": ...}."""
    await asyncio.sleep(0)  # stands for an awaited call to a messaging API
    return TaskResult.success(
        {"message": f"Welcome, {name}! Your customer number is {customer_id}.", "channel": channel}
    )
