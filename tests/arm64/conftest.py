"""The arm64 suite (make test-arm64, its own CI step): collected only with
EDGEFLEET_TEST_ARM64=1, since it needs root, network and some minutes of qemu-user.

Session fixtures: the cross-built arm64 .deb (with LiteRT) and a throwaway copy of the
cached emulated Debian 12 root with /proc, /sys and /dev mounted and the .deb installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .rootfs import EmulationUnavailable, build_rootfs, chroot_argv, mounted, still_mounted

REPO = Path(__file__).resolve().parents[2]

if not os.environ.get("EDGEFLEET_TEST_ARM64"):
    collect_ignore_glob = ["test_*.py"]


FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def report_figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add a line to the "arm64 figures" section printed at the end of the run."""
    return request.config.stash.setdefault(FIGURES, []).append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.section("arm64 figures")
        for line in figures:
            terminalreporter.write_line(line)


@dataclass
class ArmDeb:
    path: Path
    fields: dict[str, str]


@pytest.fixture(scope="session")
def arm64_deb(tmp_path_factory: pytest.TempPathFactory) -> ArmDeb:
    """``build.sh --arch arm64 --extras agent,litert`` on this (amd64) machine."""
    for tool in ("dpkg-deb", "readelf"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages dpkg, binutils); make deps-system")
    out = tmp_path_factory.mktemp("deb-arm64")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run(["sh", str(REPO / "packaging/deb/build.sh"), "--arch", "arm64", "--extras",
                        "agent,litert", "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    info = subprocess.run(["dpkg-deb", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    return ArmDeb(path, dict(re.findall(r"^([A-Za-z-]+): (.*)$", info, flags=re.M)))


@pytest.fixture(scope="session")
def arm64_root(arm64_deb: ArmDeb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of the cached arm64 root, mounted, with the arm64 .deb installed by dpkg."""
    try:
        cached = build_rootfs(log=tmp_path_factory.getbasetemp() / "debootstrap.log")
    except EmulationUnavailable as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("arm64") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(root)], check=True)
    try:
        with mounted(root):
            shutil.copy(arm64_deb.path, root / "tmp/edgefleet-agent.deb")
            r = subprocess.run(chroot_argv(root, "dpkg", "-i", "/tmp/edgefleet-agent.deb"),
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            yield root
    finally:
        if not still_mounted(root):
            shutil.rmtree(root, ignore_errors=True)
