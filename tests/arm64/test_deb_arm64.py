"""`build.sh --arch arm64` on an amd64 machine: an arm64 package whose every ELF file is
aarch64 (checked with file and readelf, independently of build.sh's own check), for
Debian 12's python3.11, with Depends naming what its binaries link."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, ArmDeb

pytestmark = pytest.mark.timeout(900)  # the cross build fetches ~60 MB of wheels


def test_control_fields_are_arm64_and_bookworm(arm64_deb: ArmDeb) -> None:
    f = arm64_deb.fields
    assert f["Architecture"] == "arm64"
    depends = [d.strip() for d in f["Depends"].split(",")]
    assert "python3.11" in depends and "passwd" in depends, depends
    assert "libstdc++6" in depends, depends  # onnxruntime and LiteRT are C++
    libc = next(d for d in depends if d.startswith("libc6"))
    floor = re.fullmatch(r"libc6 \(>= 2\.(\d+)\)", libc)
    assert floor and 17 <= int(floor[1]) <= 36, libc  # what the wheels ask, within bookworm's 2.36
    assert arm64_deb.path.name.endswith("_arm64.deb")


def test_every_elf_file_is_aarch64(arm64_deb: ArmDeb, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(arm64_deb.path), str(tmp_path)], check=True)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    elves = [p for p in files if p.open("rb").read(4) == b"\x7fELF"]
    names = {p.name for p in elves}
    assert any(n.startswith("onnxruntime_pybind11_state") for n in names), sorted(names)
    assert any("_pywrap_tensorflow_interpreter_wrapper" in n or "litert" in n.lower() for n in names), \
        sorted(names)
    described = subprocess.run(["file", "-b", *map(str, elves)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    wrong = [(str(p.relative_to(tmp_path)), d) for p, d in zip(elves, described, strict=True)
             if "ARM aarch64" not in d]
    assert not wrong, wrong
    headers = subprocess.run(["readelf", "-h", *map(str, elves)], capture_output=True, text=True,
                             check=True).stdout
    machines = re.findall(r"^\s*Machine:\s*(.*)$", headers, flags=re.M)
    assert len(machines) == len(elves) and set(machines) == {"AArch64"}, set(machines)
    # The venv runs the device's python3.11 (a symlink, not a copied amd64 binary).
    venv = tmp_path / "opt/edgefleet"
    assert (venv / "bin/python").readlink() == Path("/usr/bin/python3.11")
    assert (venv / "lib/python3.11/site-packages/agent/main.py").is_file()
    # byte-code compiled for 3.11 at build time
    assert list((venv / "lib/python3.11/site-packages/agent/__pycache__").glob("*.cpython-311.pyc"))


def test_32bit_arm_is_refused_with_the_reason() -> None:
    r = subprocess.run(["sh", str(REPO / "packaging/deb/build.sh"), "--arch", "armhf"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no onnxruntime wheels" in r.stderr and "32-bit" in r.stderr, r.stderr
    r = subprocess.run(["sh", str(REPO / "packaging/deb/build.sh"), "--arch", "riscv64"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "use amd64 or arm64" in r.stderr, r.stderr
