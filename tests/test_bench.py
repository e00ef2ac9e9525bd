"""The benchmark runs end to end in its shortest mode (no figures are asserted here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.skipif(
    shutil.which("h2load") is None,
    reason="h2load (Debian's nghttp2-client) is not installed; scripts/test installs it as root",
)
def test_bench_quick_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    from bench.run import SCENARIOS

    assert set(report["results"]) == set(SCENARIOS)
    for name in ("execute", "stream", "execute_sqlite", "stream_sqlite"):
        for row in report["results"][name]["rows"]:
            # Real answers came back from every server (not gRPC errors).
            assert all(row[who]["answers_ok"] for who in ("flowsvc", "floor", "ceiling")), row
            assert row["ceiling_ratio"] > 0, row
    assert report["results"]["slow_async"]["all_succeeded"]
    assert report["results"]["slow_sync"]["all_succeeded"]
