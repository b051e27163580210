"""An emulated aarch64 Debian root for the arm64 tests: Debian's qemu-user-static registered
through binfmt_misc, a root made with ``debootstrap --arch=arm64``, cached between runs under
~/.cache/edgefleet/arm64-rootfs/<key> (the key hashes everything that makes the root), and a
chroot with /proc and /dev mounted that is always unmounted afterwards.

The host's /sys is not mounted: it describes the host's x86 CPUs (cache levels, clusters), and
onnxruntime's cpuinfo, built for aarch64, crashes (SIGSEGV in import onnxruntime, 1.32 under
Debian 12's qemu 7.2) parsing it. Without /sys it falls back to /proc and runs correctly. A
real arm64 board has its own /sys; this is a property of the emulation, not of the device.

``python tests/arm64/rootfs.py`` builds (or finds) the cached root and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUITE = "bookworm"  # Debian 12: python3.11, glibc 2.36 (the .deb's target)
MIRROR = os.environ.get("EDGEFLEET_ARM64_MIRROR", "http://deb.debian.org/debian")
VARIANT = "minbase"
INCLUDE = ("python3", "python3-venv", "libstdc++6", "ca-certificates")
RECIPE_VERSION = "1"  # bump when the way the root is made changes
CACHE = Path(os.environ.get("EDGEFLEET_ARM64_CACHE", Path.home() / ".cache/edgefleet/arm64-rootfs"))
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_PACKAGE = "qemu-user-static"
MOUNTS = ("proc", "dev")


class EmulationUnavailable(RuntimeError):
    """aarch64 binaries cannot run here; the message names the Debian package or step missing."""


def cache_key() -> str:
    recipe = "\n".join((RECIPE_VERSION, SUITE, MIRROR, VARIANT, ",".join(INCLUDE)))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _which(name: str) -> str | None:
    dirs = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
    found = (f"{d}/{name}" for d in dirs if os.access(f"{d}/{name}", os.X_OK))
    return shutil.which(name) or next(found, None)


def ensure_binfmt() -> None:
    """Register qemu-aarch64 with binfmt_misc (mounting it first when needed), or explain why not."""
    if (BINFMT / "qemu-aarch64").exists():
        return
    if _which("qemu-aarch64-static") is None:
        raise EmulationUnavailable(f"qemu-aarch64-static is not installed: apt-get install {QEMU_PACKAGE} "
                                   f"(Debian package '{QEMU_PACKAGE}'); make deps-system installs it")
    if os.geteuid() != 0:
        raise EmulationUnavailable("registering qemu-aarch64 with binfmt_misc needs root (CI runs as root)")
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=False,
                       capture_output=True)
    for tool in ("/usr/lib/systemd/systemd-binfmt", "/lib/systemd/systemd-binfmt", "update-binfmts"):
        path = _which(tool) if not tool.startswith("/") else (tool if os.access(tool, os.X_OK) else None)
        if path is None:
            continue
        argv = [path] if "systemd" in path else [path, "--enable", "qemu-aarch64"]
        subprocess.run(argv, check=False, capture_output=True)
        if (BINFMT / "qemu-aarch64").exists():
            return
    raise EmulationUnavailable(
        f"qemu-aarch64 is not registered in {BINFMT} (binfmt_misc not mountable here, or neither "
        f"systemd-binfmt nor update-binfmts could register it): install {QEMU_PACKAGE} and systemd or "
        "binfmt-support, on a kernel with binfmt_misc")


def build_rootfs(cache: Path = CACHE, log: Path | None = None) -> Path:
    """The cached arm64 root, made with debootstrap when absent (some 4 minutes under qemu-user)."""
    ensure_binfmt()
    root = cache / cache_key()
    if (root / ".complete").exists():
        return root
    debootstrap = _which("debootstrap")
    if debootstrap is None:
        raise EmulationUnavailable("debootstrap is not installed: apt-get install debootstrap "
                                   "(Debian package 'debootstrap'); make deps-system installs it")
    partial = cache / f"{cache_key()}.partial"
    if partial.exists():
        _unmount_all(partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    argv = [debootstrap, "--arch=arm64", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
            SUITE, str(partial), MIRROR]
    with open(log or os.devnull, "ab") as out:
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"debootstrap --arch=arm64 {SUITE} failed ({r.returncode}); see "
                           f"{partial}/debootstrap/debootstrap.log")
    # apt lists and the downloaded .debs are not needed by the tests
    shutil.rmtree(partial / "var/cache/apt/archives", ignore_errors=True)
    (partial / ".complete").write_text(" ".join(argv) + "\n")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def _mounted_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def still_mounted(root: Path) -> list[str]:
    """Mount points under ``root`` (never delete a root while one is left: it may be the host's /dev)."""
    return _mounted_under(root)


def _unmount_all(root: Path) -> None:
    for point in sorted(_mounted_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """/proc and /dev inside ``root`` (onnxruntime reads /proc/cpuinfo, the agent /dev/urandom;
    /sys is left out, see the module's doc), unmounted on the way out, even after a failure."""
    _unmount_all(root)  # a run killed before its cleanup
    try:
        for name in MOUNTS:
            target = root / name
            target.mkdir(exist_ok=True)
            if name == "proc":
                subprocess.run(["mount", "-t", "proc", "proc", str(target)], check=True)
            else:
                subprocess.run(["mount", "--rbind", f"/{name}", str(target)], check=True)
                subprocess.run(["mount", "--make-rslave", str(target)], check=True)
        yield root
    finally:
        _unmount_all(root)


def chroot_argv(root: Path, *argv: str, user: str | None = None) -> list[str]:
    """A command run inside ``root`` (as ``user``, default root) with a clean environment."""
    who = [f"--userspec={user}:{user}"] if user else []
    return ["chroot", *who, str(root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8", "HOME=/root", *argv]


if __name__ == "__main__":
    print(build_rootfs(log=Path(sys.argv[1]) if len(sys.argv) > 1 else None))
