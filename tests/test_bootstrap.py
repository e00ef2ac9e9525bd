"""scripts/bootstrap, which scripts/serve and scripts/test run first: when it installs.

Each test runs the real script in a copy of the files it reads, with a stand-in Python
whose `-m venv` and `-m pip` only write down that they ran: no network, no real install.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, wait_until

#: Stands in for Python: `-m venv [--clear] DIR` makes DIR/bin/python (this script again),
#: `-m pip ...` logs and succeeds (after FAKE_HOLD exists, when set); the rest is Python.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = venv ]; then
  echo "venv ${*:3}" >> "$FAKE_LOG"
  dir=${!#}
  [ "$3" = --clear ] && rm -rf "$dir"
  mkdir -p "$dir/bin" && ln -sf "$FAKE_PYTHON" "$dir/bin/python"
  exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "pip start $PPID" >> "$FAKE_LOG"
  echo "${*:3}" >> "$FAKE_LOG.args"
  while [ -n "${FAKE_HOLD:-}" ] && [ ! -e "$FAKE_HOLD" ]; do sleep 0.01; done
  echo "pip end $PPID" >> "$FAKE_LOG"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""

#: The files whose contents decide whether bootstrap installs again, in its order.
STAMPED = ("pyproject.toml", "constraints.txt", "package.json", "package-lock.json")


def tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of what bootstrap reads, and the environment that runs it with the fake."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "bootstrap", root / "scripts" / "bootstrap")
    for name in STAMPED:
        shutil.copy2(ROOT / name, root / name)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "FAKE_PYTHON": str(fake),
        "REAL_PYTHON": sys.executable,
        "FAKE_LOG": str(tmp_path / "log"),
    }
    return root, env


def stamp(root: Path, want: str) -> Path:
    """The file bootstrap leaves in .venv once `want` (runtime or dev) is installed."""
    text = b"".join((root / n).read_bytes() for n in STAMPED)
    return root / ".venv" / f".installed-{want}-{hashlib.sha256(text).hexdigest()[:16]}"


def bootstrap(
    root: Path, env: dict[str, str], want: str = "runtime"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "scripts" / "bootstrap"), want],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


def test_first_run_installs_and_the_second_does_nothing(tmp_path: Path) -> None:
    root, env = tree(tmp_path)
    result = bootstrap(root, env)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in log(tmp_path)] == ["venv", "pip", "pip", "pip", "pip"]
    assert stamp(root, "runtime").exists()

    (tmp_path / "log").unlink()
    result = bootstrap(root, env)
    assert result.returncode == 0, result.stderr
    assert log(tmp_path) == []


def test_the_package_installs_at_the_pinned_versions_and_new_pins_install_again(
    tmp_path: Path,
) -> None:
    root, env = tree(tmp_path)
    assert bootstrap(root, env).returncode == 0
    args = tmp_path / "log.args"
    installs = [line for line in args.read_text().splitlines() if line.endswith("-e .")]
    assert len(installs) == 1 and "-c constraints.txt" in installs[0]
    args.unlink()
    with (root / "constraints.txt").open("a") as pins:
        pins.write("example==1.0\n")  # a version moved (scripts/pin_deps.py)
    result = bootstrap(root, env)
    assert result.returncode == 0, result.stderr
    assert "-c constraints.txt -e ." in args.read_text()


def test_after_a_dev_install_runtime_needs_no_install(tmp_path: Path) -> None:
    # scripts/test (dev: the package and its test tools), then scripts/serve (runtime):
    # the dev install holds everything serve needs, so serve must not reach for the
    # network again (it failed offline).
    root, env = tree(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(env["FAKE_PYTHON"])
    stamp(root, "dev").touch()
    result = bootstrap(root, env, "runtime")
    assert result.returncode == 0, result.stderr
    assert log(tmp_path) == []
    assert "installing" not in result.stderr


def children(pid: int) -> list[str]:
    """Command names of the processes `pid` started that still run."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    names = []
    for child in text.split():
        with contextlib.suppress(OSError):  # it ended meanwhile
            names.append(Path(f"/proc/{child}/comm").read_text().strip())
    return names


@pytest.mark.skipif(not shutil.which("flock"), reason="bootstrap serializes itself with flock")
def test_two_first_runs_at_once_install_once(tmp_path: Path) -> None:
    # scripts/serve and scripts/test started together on a fresh clone: both created .venv
    # and ran pip into it at once, and one died in a pip traceback.
    root, env = tree(tmp_path)
    hold = tmp_path / "release"
    env = {**env, "FAKE_HOLD": str(hold)}
    run = [str(root / "scripts" / "bootstrap"), "runtime"]
    first = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert wait_until(lambda: any(line.startswith("pip start") for line in log(tmp_path)))
        second = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
        # The second one either waits for the first (in flock) or installs beside it.
        assert wait_until(
            lambda: "flock" in children(second.pid) or f"pip start {second.pid}" in log(tmp_path)
        )
        hold.touch()
        assert first.wait(timeout=60) == 0
        assert second.wait(timeout=60) == 0
    finally:
        hold.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert not [line for line in log(tmp_path) if line.endswith(f" {second.pid}")]
    pips = [line for line in log(tmp_path) if line.startswith("pip")]
    assert [line.split()[-1] for line in pips] == [str(first.pid)] * 4


def test_a_venv_whose_python_is_gone_is_made_again(tmp_path: Path) -> None:
    # A pyenv or Homebrew upgrade removes the interpreter .venv links to: bootstrap then
    # ran `python3 -m venv .venv` over it, which fails ("No such file or directory:
    # .venv/bin/python3"), and its old stamp said everything was installed.
    root, env = tree(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(tmp_path / "python3.11-uninstalled")
    stamp(root, "runtime").touch()
    result = bootstrap(root, env)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in log(tmp_path)] == ["venv", "pip", "pip", "pip", "pip"]
    assert log(tmp_path)[0] == "venv --clear .venv"


def test_a_venv_of_a_python_too_old_is_made_again(tmp_path: Path) -> None:
    # A .venv left by Python 3.10: pip refused to install into it ("requires a different
    # Python: 3.10.13 not in '>=3.11'") and bootstrap never got past that.
    root, env = tree(tmp_path)
    (root / ".venv" / "bin").mkdir(parents=True)
    old = root / ".venv" / "bin" / "python"
    old.write_text("#!/usr/bin/env bash\necho 'requires a different Python' >&2\nexit 1\n")
    old.chmod(0o755)
    result = bootstrap(root, env)
    assert result.returncode == 0, result.stderr
    assert log(tmp_path)[0] == "venv --clear .venv"
    assert "requires a different Python" not in result.stderr
