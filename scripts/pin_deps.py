"""Write constraints.txt: the exact version of every package flowsvc[dev] installs.

pyproject.toml states ranges (what flowsvc works with); constraints.txt pins what the
suite last ran against, so that a fresh machine (CI, `scripts/bootstrap`, the image's
`pip install`) installs those same versions, not whatever was released since.

    .venv/bin/python scripts/pin_deps.py          # after changing pyproject.toml's deps
    .venv/bin/python scripts/pin_deps.py --check  # fails if constraints.txt is stale

The versions are read from the environment it runs in (.venv after scripts/bootstrap
dev): first install what you want, then pin, then run scripts/test (which fails while the
pins disagree with .venv), and commit constraints.txt with pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = (
    "# Every package `pip install -e .[dev]` installs, at the version the suite ran with.\n"
    "# Made by scripts/pin_deps.py (never edited by hand); pip reads it with -c.\n"
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "flowsvc", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """{canonical name: installed version} of what installing `root[extras]` pulled in
    (`root` itself left out), following each requirement that applies here."""
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = canonical(name)
        if key != canonical(root):
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            applies = req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in ("", *wanted)
            )
            if applies and canonical(req.name) not in found:
                todo.append((req.name, tuple(req.extras)))
    return found


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if constraints.txt is stale")
    args = parser.parse_args()
    wanted = render(closure())
    if args.check:
        current = CONSTRAINTS.read_text() if CONSTRAINTS.exists() else ""
        if current != wanted:
            print(
                "constraints.txt does not match the installed packages: run "
                ".venv/bin/python scripts/pin_deps.py (after scripts/bootstrap dev)",
                file=sys.stderr,
            )
            return 1
        return 0
    CONSTRAINTS.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
