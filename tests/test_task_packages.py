"""Task packages: `pip install` one and a server has its tasks, with no configuration.

Installs the README's worked example (examples/acme-flow-tasks) with pip into a folder
of its own, and starts a real server that sees that folder: its tasks arrive through the
`flowsvc.tasks` entry-point group. The test venv itself is never changed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from google.protobuf import json_format

from tests.support import PIP_OFFLINE, ROOT, server_process, to_dict

pb = flow_service_pb2
EXAMPLE = ROOT / "examples" / "acme-flow-tasks"


def pip_install(source: Path, site: Path, tmp_path: Path) -> None:
    # Built from a copy: pip builds in place and would leave build/ files in the repo.
    copy = tmp_path / "src" / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            *PIP_OFFLINE,
            "--target",
            str(site),
            str(copy),
        ],
        check=True,
        timeout=300,
    )


def onboarding(db_path: Path) -> flow_pb2.Flow:
    return json_format.ParseDict(
        {
            "name": "onboarding",
            "start_task": "acme_save_customer",
            "tasks": [
                {
                    "name": "acme_save_customer",
                    "params": {
                        "db_path": str(db_path),
                        "name": "${input.name}",
                        "email": "${input.email}",
                    },
                },
                {
                    "name": "acme_welcome",
                    "params": {
                        "customer_id": "${acme_save_customer.data.customer_id}",
                        "name": "${input.name}",
                    },
                },
            ],
            "conditions": [
                {
                    "source_task": "acme_save_customer",
                    "target_task_success": "acme_welcome",
                    "target_task_failure": "end",
                }
            ],
        },
        flow_pb2.Flow(),
    )


async def test_installed_package_adds_its_tasks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    pip_install(EXAMPLE, site, tmp_path)
    env = {"PYTHONPATH": str(site)}
    with server_process(tmp_path, env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            tasks = {t.name: t for t in (await stub.ListTasks(pb.ListTasksRequest())).tasks}
            save = tasks["acme_save_customer"]
            assert save.source == "acme_flow_tasks.tasks:save_customer"
            assert save.description.startswith("Store a customer")
            assert not save.is_async and save.takes_context
            schema = to_dict(save.params_schema)
            assert schema["required"] == ["db_path", "name", "email"]
            assert tasks["acme_welcome"].is_async

            db = tmp_path / "customers.db"
            request = pb.ExecuteFlowRequest(flow=onboarding(db))
            request.input.update({"name": "Ada", "email": "ada@example.org"})
            response = await stub.ExecuteFlow(request, timeout=30)
            assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED, response.message
            welcome = to_dict(response.execution_history[-1].data)
            assert welcome["message"] == "Welcome, Ada! Your customer number is 1."
            with sqlite3.connect(db) as conn:
                assert conn.execute("SELECT name, email FROM customers").fetchall() == [
                    ("Ada", "ada@example.org")
                ]


def test_a_name_clash_between_packages_is_refused_at_start(tmp_path: Path) -> None:
    site = tmp_path / "site"
    pip_install(EXAMPLE, site, tmp_path)
    other = tmp_path / "other-tasks"
    (other / "other_tasks").mkdir(parents=True)
    (other / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=77"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "other-tasks"
            version = "0.1.0"

            [project.entry-points."flowsvc.tasks"]
            other = "other_tasks"

            [tool.setuptools]
            packages = ["other_tasks"]
            """
        )
    )
    (other / "other_tasks" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from flowsvc import TaskResult, register_task

            @register_task("acme_welcome")
            def impostor():
                return TaskResult(status="success")
            """
        )
    )
    pip_install(other, site, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0"],
        env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "acme_welcome" in result.stderr
    assert "acme_flow_tasks.tasks:welcome" in result.stderr
    assert "other_tasks:impostor" in result.stderr


async def test_a_package_module_named_in_task_modules_brings_its_registry(
    tmp_path: Path,
) -> None:
    # Not installed (no entry point): named with --task-modules, its TaskRegistry is merged.
    (tmp_path / "empty_tasks.py").write_text("X = 1\n")
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(tmp_path)])}
    args = ("--task-modules", "acme_flow_tasks.tasks,empty_tasks")
    with server_process(tmp_path, *args, env=env) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            names = {t.name for t in (await stub.ListTasks(pb.ListTasksRequest())).tasks}
            assert {"acme_save_customer", "acme_welcome"} <= names
            # Merged from the package's registry, `customer_id: int` still gets an int:
            # the 7 written in the flow arrives as 7.0.
            welcome = json_format.ParseDict(
                {
                    "name": "welcome",
                    "start_task": "acme_welcome",
                    "tasks": [
                        {"name": "acme_welcome", "params": {"customer_id": 7, "name": "Ada"}}
                    ],
                },
                flow_pb2.Flow(),
            )
            response = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=welcome), timeout=30)
            assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED, response.message
            message = to_dict(response.execution_history[0].data)["message"]
            assert message == "Welcome, Ada! Your customer number is 7."
        # A module that brings nothing is worth a warning, not silence.
        warned = [
            line for line in srv.log_lines() if line["msg"] == "task module registered no tasks"
        ]
        assert [line["task_module"] for line in warned] == ["empty_tasks"]


def test_a_task_module_that_exits_as_it_is_imported_is_named_at_start(tmp_path: Path) -> None:
    # sys.exit() at import (a module checking its own configuration) stopped the server
    # with that exit code and no word of which module, or nothing at all for a number.
    (tmp_path / "quits_tasks.py").write_text("import sys\n\nsys.exit(3)\n")
    result = subprocess.run(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0"],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "FLOWSVC_TASK_MODULES": "quits_tasks"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    assert "cannot import task module 'quits_tasks': SystemExit: 3" in result.stderr


def _package(root: Path, name: str, entry_point: str, code: str) -> Path:
    """A task package `name` (module `name_tasks`) whose flowsvc.tasks entry point is
    `entry_point` and whose module holds `code`."""
    module = name.replace("-", "_")
    (root / module).mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=77"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"

            [project.entry-points."flowsvc.tasks"]
            {module} = "{entry_point}"

            [tool.setuptools]
            packages = ["{module}"]
            """
        )
    )
    (root / module / "__init__.py").write_text(textwrap.dedent(code))
    return root


async def test_an_entry_point_naming_a_module_brings_its_registry_or_is_warned_of(
    tmp_path: Path,
) -> None:
    # An entry point naming the module (`pkg.tasks`, without `:registry`) brought only
    # its @register_task tasks: those in its TaskRegistry were silently missing, though
    # --task-modules brings them; and one bringing nothing was not warned of.
    site = tmp_path / "site"
    registry_code = """
        from flowsvc import TaskRegistry, TaskResult

        registry = TaskRegistry()

        @registry.task("in_a_registry")
        def in_a_registry():
            return TaskResult.success()
        """
    pip_install(_package(tmp_path / "a", "reg-tasks", "reg_tasks", registry_code), site, tmp_path)
    pip_install(_package(tmp_path / "b", "none-tasks", "none_tasks", "X = 1\n"), site, tmp_path)
    with server_process(tmp_path, env={"PYTHONPATH": str(site)}) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            names = {t.name for t in (await stub.ListTasks(pb.ListTasksRequest())).tasks}
            assert "in_a_registry" in names
        warned = [
            line for line in srv.log_lines() if line["msg"] == "task module registered no tasks"
        ]
        assert [line["task_module"] for line in warned] == ["none_tasks"]
        assert warned[0]["entry_point"] == "none_tasks = none_tasks"
