"""The engine side of flowsvc imports neither grpc nor protobuf nor the generated code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

ENGINE_SIDE = [
    "flowsvc/models.py",
    "flowsvc/errors.py",
    "flowsvc/registry.py",
    "flowsvc/validation.py",
    "flowsvc/engine.py",
    "flowsvc/logs.py",
    "flowsvc/threads.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "flowsvc" / "tasks").glob("*.py")),
]
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google", "flowmanager")
UPPER = ("flowsvc.convert", "flowsvc.servicer", "flowsvc.server", "flowsvc.cli", "flowsvc.config")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("relpath", ENGINE_SIDE)
def test_engine_side_module_knows_nothing_of_grpc(relpath: str) -> None:
    for name in imported_modules(ROOT / relpath):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{relpath} imports {name}"
        assert not name.startswith(UPPER), f"{relpath} imports {name} (wrong direction)"


def test_importing_the_engine_loads_no_grpc() -> None:
    code = (
        "import sys, flowsvc, flowsvc.engine, flowsvc.tasks; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{FORBIDDEN!r}); print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_engine_bench_runs_in_its_shortest_mode(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.exists() and "us/step" in result.stdout
