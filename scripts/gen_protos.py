"""Generate generated/flowmanager/v1 from proto/ with grpcio-tools.

The only way code in generated/ is made. `--check` regenerates into a temporary
folder and fails when the result differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "generated"
#: The FileDescriptorSet of proto/ with comments, relative to generated/.
DESCRIPTOR_SET = "flowmanager/v1/descriptor_set.binpb"


def generate(out: Path) -> None:
    """Run protoc on every .proto under proto/, writing into `out`."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        # The protos with their comments (SourceCodeInfo, which _pb2.py leaves out), for
        # server reflection: `grpcurl describe` shows them.
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        "--include_source_info",
        *protos,
    ]
    (out / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Make every generated directory a regular package, so mypy and setuptools see it.
    for module in out.rglob("*_pb2.py"):
        for directory in module.parents:
            if directory == out:
                break
            (directory / "__init__.py").touch()
    (out / "flowmanager" / "py.typed").touch()


def tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(OUT / "flowmanager", ignore_errors=True)
        generate(OUT)
        print(f"generated {len(tree(OUT))} files in generated/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = tree(fresh), tree(OUT)
        stale = sorted(
            name
            for name in set(want) | set(have)
            if name not in want
            or name not in have
            or not filecmp.cmp(want[name], have[name], shallow=False)
        )
    if stale:
        print("generated/ is stale; run scripts/gen_protos.py. Differs:", *stale, sep="\n  ")
        return 1
    print("generated/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
