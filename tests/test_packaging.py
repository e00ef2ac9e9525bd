"""The package as the container installs it: a wheel holding flowsvc and the generated code.

No Docker engine runs on our machines, so this replays the Dockerfile's install step
(`pip install .` of the .dockerignore'd context) and runs the installed server and probe
outside the source tree, as the image's ENTRYPOINT and HEALTHCHECK do.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

from tests.support import PIP_OFFLINE, READY_PREFIX, ROOT


def _docker_context(dest: Path) -> Path:
    """Copy what .dockerignore lets into the build context (it allow-lists with !)."""
    dest.mkdir(parents=True)
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for name in allowed:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def test_dockerfile_copies_what_dockerignore_allows() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.M)
    sources = {s.rstrip("/") for line in copied for s in line.split()}
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert sources == allowed
    assert re.search(
        r'^HEALTHCHECK .*\n\s+CMD \["flowsvc", "probe", "--timeout"', dockerfile, flags=re.M
    )
    assert re.search(r'^VOLUME \["/app/data"\]', dockerfile, flags=re.M)
    assert re.search(r"^USER \d+", dockerfile, flags=re.M)


def test_wheel_installs_and_serves_outside_the_tree(tmp_path: Path) -> None:
    context = _docker_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *PIP_OFFLINE, "-q", "-w", str(wheels), str(context)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("flowsvc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "flowsvc/engine.py",
        "flowsvc/py.typed",
        "flowmanager/v1/flow_service_pb2.py",
        "flowmanager/v1/flow_service_pb2.pyi",
        "flowmanager/v1/flow_service_pb2_grpc.py",
        "flowmanager/v1/descriptor_set.binpb",
    ):
        assert required in names
    assert not [n for n in names if n.startswith("tests/")]
    # pyproject says MIT: the license's text goes with the wheel, and its metadata says so.
    info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    assert f"{info}/licenses/LICENSE" in names
    license_text = zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE").decode()
    assert license_text == (ROOT / "LICENSE").read_text()
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata

    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            *PIP_OFFLINE,
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Only the installed copy is importable: not the source tree, not generated/.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0"],
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        address = line.strip().removeprefix(READY_PREFIX)
        check = (
            "import flowsvc, flowmanager.v1.flow_pb2 as m; "
            f"assert flowsvc.__file__.startswith({str(site)!r}), flowsvc.__file__; "
            f"assert m.__file__.startswith({str(site)!r}), m.__file__"
        )
        subprocess.run([sys.executable, "-c", check], cwd=run_dir, env=env, check=True, timeout=60)
        # As the image's HEALTHCHECK does: no --address; the port comes from FLOWSVC_LISTEN,
        # the setting the container's server was started with.
        port = address.rsplit(":", 1)[1]
        probe = subprocess.run(
            [sys.executable, "-m", "flowsvc", "probe"],
            cwd=run_dir,
            env={**env, "FLOWSVC_LISTEN": f"[::]:{port}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode == 0 and probe.stdout.strip() == "SERVING"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def _lowest(requirement: str) -> tuple[int, ...]:
    """The version after `>=` in a requirement such as 'grpcio>=1.85.1'."""
    (version,) = re.findall(r">=\s*([\d.]+)", requirement)
    return tuple(int(part) for part in version.split("."))


def test_dependencies_admit_no_runtime_the_generated_code_refuses() -> None:
    # The generated modules check at import the grpcio and protobuf they run on, and raise
    # on one older than what generated them: pyproject's lowest versions must not be older
    # (it said grpcio>=1.66 of stubs that need 1.85.1).
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.split(r"[<>=;\s]", r, maxsplit=1)[0]: r for r in requirements}
    stubs = ROOT / "generated" / "flowmanager" / "v1"
    (grpc_made_by,) = re.findall(
        r"^GRPC_GENERATED_VERSION = '([\d.]+)'$",
        (stubs / "flow_service_pb2_grpc.py").read_text(),
        flags=re.M,
    )
    assert _lowest(by_name["grpcio"]) >= tuple(int(p) for p in grpc_made_by.split("."))
    (protobuf_made_by,) = re.findall(
        r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", (stubs / "flow_pb2.py").read_text()
    )
    assert _lowest(by_name["protobuf"]) >= tuple(int(p) for p in protobuf_made_by)


def test_constraints_pin_every_installed_package_and_are_used() -> None:
    # A fresh machine installs what the suite ran with: every package of .[dev] is pinned
    # at the version installed here, and both installs (bootstrap, image) read the pins.
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pin_deps.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("grpcio", "protobuf", "grpcio-tools", "pytest", "httpx", "h11"):
        assert pins[name] == metadata.version(name)
    assert "flowsvc" not in pins
    assert re.search(
        r"^RUN pip install .*-c constraints\.txt \.", (ROOT / "Dockerfile").read_text(), flags=re.M
    )
    assert "-c constraints.txt -e" in (ROOT / "scripts" / "bootstrap").read_text()


def test_the_license_is_mit_and_goes_with_the_sdist(tmp_path: Path) -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the flowsvc authors" in license_text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    context = _docker_context(tmp_path / "context")
    dist = tmp_path / "dist"
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(dist)], cwd=context, check=True, timeout=300)
    (sdist,) = dist.glob("flowsvc-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        assert "LICENSE" in names
        assert (
            "License-Expression: MIT"
            in archive.extractfile(
                next(m for m in archive.getmembers() if m.name.endswith("/PKG-INFO"))
            )
            .read()
            .decode()
        )
