"""What an operator reads in a real server's log: its settings at start, why a task raised
or a flow was cancelled, and refusals at the in-flight cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import server_process, wait_until


def lines_with(srv: Any, msg: str, count: int = 1) -> list[dict[str, Any]]:
    """The server's log lines saying `msg`, once there are at least `count` of them."""

    def found() -> list[dict[str, Any]]:
        lines = [line for line in srv.log_lines() if line["msg"] == msg]
        return lines if len(lines) >= count else []

    return wait_until(found)


def test_the_start_line_shows_the_effective_settings(tmp_path: Path) -> None:
    env = {"FLOWSVC_LOG_LEVEL": "info", "FLOWSVC_MAX_IN_FLIGHT": "7"}
    with server_process(
        tmp_path, "--db", "x.db", "--sync-task-workers", "3", "--max-tasks", "50", env=env
    ) as srv:
        (line,) = lines_with(srv, "server started")
    settings = line["settings"]
    assert line["port"] == srv.port
    assert settings["listen"] == "127.0.0.1:0"
    assert settings["db"] == "x.db" and settings["db_synchronous"] == "FULL"
    assert settings["max_in_flight"] == 7  # from the environment
    assert settings["sync_task_workers"] == 3 and settings["max_tasks"] == 50  # from flags
    assert settings["log_level"] == "INFO"
    assert settings["retention_seconds"] == 604800.0
    assert line["event_loop"] in {"uvloop", "asyncio"}
