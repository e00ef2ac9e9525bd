"""Testing tasks without a server: call them, or run a flow through the engine in-process."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from acme_flow_tasks.tasks import registry, save_customer, welcome

from flowsvc import (
    Condition,
    Flow,
    FlowEngine,
    FlowStatus,
    Task,
    TaskContext,
    TaskRegistry,
)


def context(**params: object) -> TaskContext:
    return TaskContext(
        flow_id="test-flow", flow_name="t", task="t", step=1, input={}, params=params, results=()
    )


def test_save_customer_called_directly(tmp_path: Path) -> None:
    db = str(tmp_path / "customers.db")
    result = save_customer(context(), db_path=db, name="Ada", email="ada@example.org")
    assert result.succeeded and result.data == {"customer_id": 1}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT name, flow_id FROM customers").fetchall() == [
            ("Ada", "test-flow")
        ]


def test_save_customer_closes_its_connection(tmp_path: Path, monkeypatch) -> None:
    # `with sqlite3.connect(...)` commits but does not close: each call left its connection
    # to the garbage collector (a ResourceWarning per flow on Python 3.13), and the README
    # shows this task as the one to copy.
    opened: list[sqlite3.Connection] = []
    connect = sqlite3.connect

    def recording(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", recording)
    result = save_customer(context(), db_path=str(tmp_path / "c.db"), name="A", email="a@b.c")
    assert result.succeeded and len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")


def test_bad_email_is_a_failure_that_is_not_retried(tmp_path: Path) -> None:
    result = save_customer(context(), db_path=str(tmp_path / "c.db"), name="X", email="nope")
    assert not result.succeeded and not result.retryable


def test_welcome_called_directly() -> None:
    result = asyncio.run(welcome(customer_id=7, name="Ada"))
    assert result.data["message"] == "Welcome, Ada! Your customer number is 7."


def test_the_onboarding_flow_in_process(tmp_path: Path) -> None:
    tasks = TaskRegistry.with_builtins()
    tasks.merge(registry)
    engine = FlowEngine(tasks)
    flow = Flow(
        name="onboarding",
        start_task="acme_save_customer",
        tasks=(
            Task(
                "acme_save_customer",
                params={
                    "db_path": str(tmp_path / "customers.db"),
                    "name": "${input.name}",
                    "email": "${input.email}",
                },
            ),
            Task(
                "acme_welcome",
                params={
                    "customer_id": "${acme_save_customer.data.customer_id}",
                    "name": "${input.name}",
                },
            ),
        ),
        conditions=(Condition("acme_save_customer", "acme_welcome", "end"),),
    )
    execution = asyncio.run(
        engine.run(engine.prepare(flow), {"name": "Ada", "email": "ada@example.org"})
    )
    assert execution.status is FlowStatus.SUCCEEDED
    assert execution.history[-1].data["message"].startswith("Welcome, Ada!")
