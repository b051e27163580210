"""The agent's .deb: built with packaging/deb/build.sh (--mode app: the full layout, no
dependencies in the virtualenv, no network), inspected with dpkg-deb, installed into a
throwaway root with dpkg --root, upgraded with a changed conffile, then purged."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PACKAGING, REPO, tool

UNIT = "lib/systemd/system/edgefleet-agent.service"
SCRIPTS = ("postinst", "prerm", "postrm")


@dataclass
class Deb:
    path: Path
    fields: dict[str, str]
    files: dict[str, str]  # path -> mode string of dpkg-deb -c
    control_dir: Path


def _run(*argv: str, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Deb:
    dpkg_deb = tool("dpkg-deb", "dpkg")
    tool("python3", "python3")
    for module, package in (("venv", "python3-venv"), ("setuptools", "python3-setuptools"),
                            ("wheel", "python3-wheel"), ("pip", "python3-pip")):
        if subprocess.run(["/usr/bin/python3", "-c", f"import {module}"], capture_output=True).returncode:
            pytest.skip(f"/usr/bin/python3 lacks {module}: apt-get install {package} (Debian package "
                        f"'{package}'); make deps-system installs it")
    out = tmp_path_factory.mktemp("deb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    built = _run("sh", str(PACKAGING / "deb" / "build.sh"), "--mode", "app", "--out", str(out), env=env)
    path = Path(built.stdout.strip().splitlines()[-1])
    info = _run(dpkg_deb, "-f", str(path)).stdout
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", info, flags=re.M))
    listing = _run(dpkg_deb, "-c", str(path)).stdout
    files = {}
    for line in listing.splitlines():
        parts = line.split(None, 5)
        name = parts[5].split(" -> ")[0].removeprefix("./").rstrip("/")
        files[name] = parts[0]
    control = out / "control"
    _run(dpkg_deb, "-e", str(path), str(control))
    return Deb(path, fields, files, control)


def test_control_fields(deb: Deb) -> None:
    assert deb.fields["Package"] == "edgefleet-agent"
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+", deb.fields["Version"])
    assert deb.fields["Architecture"] == _run("dpkg", "--print-architecture").stdout.strip()
    depends = [d.strip() for d in deb.fields["Depends"].split(",")]
    assert any(re.fullmatch(r"python3\.\d+", d) for d in depends), depends
    assert "passwd" in depends  # useradd/groupadd in postinst
    assert int(deb.fields["Installed-Size"]) > 0


def test_files_and_modes(deb: Deb) -> None:
    f = deb.files
    for path in ("opt/edgefleet/bin/edgefleet-agent", "opt/edgefleet/pyvenv.cfg", "etc/edgefleet/agent.toml",
                 UNIT, "usr/bin/edgefleet-agent", "usr/share/doc/edgefleet-agent/copyright",
                 "var/lib/edgefleet"):
        assert path in f, f"{path} missing from the package"
    assert f["opt/edgefleet/bin/edgefleet-agent"].startswith("-rwxr-xr-x")
    assert f["etc/edgefleet/agent.toml"] == "-rw-r-----"  # it will hold the enrollment token
    assert any(p.startswith("opt/edgefleet/lib/python3.") and p.endswith("site-packages/agent/main.py")
               for p in f)
    # byte-code compiled at build time (ProtectSystem=strict forbids writing it at run time)
    assert any(p.endswith(".pyc") and "/agent/" in p for p in f)
    # the agent never imports the fleet; the device gets neither its code nor its command
    assert not any("site-packages/fleet/" in p for p in f)
    assert "opt/edgefleet/bin/edgefleet" not in f
    assert not any("/bin/pip" in p for p in f)


def test_conffiles_and_maintainer_scripts(deb: Deb) -> None:
    assert (deb.control_dir / "conffiles").read_text().split() == ["/etc/edgefleet/agent.toml"]
    for name in SCRIPTS:
        script = deb.control_dir / name
        assert os.access(script, os.X_OK), f"{name} is not executable"
        assert script.read_text().startswith("#!/bin/sh\n")
        assert "set -e" in script.read_text()
        for shell in ("sh", "dash", "bash"):
            if shutil.which(shell):
                _run(shell, "-n", str(script))
    postinst = (deb.control_dir / "postinst").read_text()
    assert "systemctl start" not in postinst and "enable --now edgefleet" not in postinst.replace(
        "'systemctl enable --now edgefleet-agent'", "")  # never starts an unconfigured agent
    assert "daemon-reload" in postinst
    prerm = (deb.control_dir / "prerm").read_text()
    assert "systemctl stop edgefleet-agent.service" in prerm and "disable" in prerm
    assert 'rm -rf "$root/var/lib/edgefleet"' in (deb.control_dir / "postrm").read_text()


def test_no_staging_paths_leak(deb: Deb, tmp_path: Path) -> None:
    _run("dpkg-deb", "-x", str(deb.path), str(tmp_path))
    venv = tmp_path / "opt/edgefleet"
    assert (venv / "bin/edgefleet-agent").read_text().splitlines()[0] == "#!/opt/edgefleet/bin/python"
    assert os.readlink(venv / "bin/python").startswith("/usr/bin/python3.")
    for path in venv.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.suffix != ".pyc":
            assert b"edgefleet-deb." not in path.read_bytes(), f"{path} names the build directory"


@pytest.fixture
def droot(tmp_path: Path) -> Iterator[Path]:
    """An empty root with a dpkg database and the account files useradd --prefix edits."""
    root = tmp_path / "root"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc", "usr/sbin"):
        (root / d).mkdir(parents=True)
    for name in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
        (root / name).touch()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).chmod(0o640)
    yield root


def _dpkg(root: Path, *args: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("installing into a throwaway root with dpkg --root needs root (CI runs as root)")
    r = subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
                        "--force-confold", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_install_upgrade_purge_in_a_throwaway_root(deb: Deb, droot: Path, tmp_path: Path) -> None:
    tool("useradd", "passwd")
    out = _dpkg(droot, "-i", str(deb.path))
    assert "not started" in out  # the example config still says CHANGE-ME

    users = {line.split(":")[0]: line.split(":") for line in (droot / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (droot / "etc/group").read_text().splitlines()}
    assert "edgefleet" in users and "edgefleet" in groups
    uid, gid = int(users["edgefleet"][2]), int(groups["edgefleet"][2])
    assert users["edgefleet"][6] == "/usr/sbin/nologin" and uid < 1000  # a system user
    state = (droot / "var/lib/edgefleet").stat()
    assert (state.st_uid, state.st_gid, state.st_mode & 0o777) == (uid, gid, 0o750)
    conf = (droot / "etc/edgefleet/agent.toml").stat()
    assert (conf.st_uid, conf.st_gid, conf.st_mode & 0o777) == (0, gid, 0o640)

    # Every path the unit names exists in the installed root: ExecStart (verified by
    # systemd-analyze on a copy whose paths point into the root), config, state.
    unit = (droot / UNIT).read_text()
    exec_start = re.search(r"^ExecStart=(\S+) --config (\S+)", unit, flags=re.M)
    assert exec_start
    assert os.access(droot / exec_start[1].lstrip("/"), os.X_OK)
    assert (droot / exec_start[2].lstrip("/")).is_file()
    for rw in re.findall(r"^ReadWritePaths=(.*)$", unit, flags=re.M):
        for path in rw.split():
            assert (droot / path.lstrip("/")).is_dir(), path
    analyze = shutil.which("systemd-analyze")
    if analyze:
        copy = tmp_path / "edgefleet-agent.service"
        copy.write_text(unit.replace("ExecStart=/opt/", f"ExecStart={droot}/opt/"))
        r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # The venv's interpreter finds its own site-packages (not the build's, not the repo's).
    r = _run(str(droot / "opt/edgefleet/bin/python"), "-I", "-c",
             "import sys, agent; print(sys.prefix); print(agent.__file__)", cwd=tmp_path)
    prefix, agent_file = r.stdout.split()
    assert prefix == str(droot / "opt/edgefleet") and agent_file.startswith(prefix)

    # An upgrade keeps the administrator's config (a conffile) and the state.
    (droot / "etc/edgefleet/agent.toml").write_text('device_id = "kept"\n')
    (droot / "var/lib/edgefleet/marker").write_text("state")
    _dpkg(droot, "-i", str(deb.path))
    assert (droot / "etc/edgefleet/agent.toml").read_text() == 'device_id = "kept"\n'
    assert (droot / "var/lib/edgefleet/marker").exists()
    assert sum(line.startswith("edgefleet:") for line in (droot / "etc/passwd").read_text().splitlines()) == 1

    # Remove keeps config and state; purge removes both (the user stays, per Debian policy).
    _dpkg(droot, "--remove", "edgefleet-agent")
    assert not (droot / "opt/edgefleet/bin/edgefleet-agent").exists()
    assert (droot / "var/lib/edgefleet/marker").exists()
    assert (droot / "etc/edgefleet/agent.toml").exists()
    _dpkg(droot, "--purge", "edgefleet-agent")
    assert not (droot / "var/lib/edgefleet").exists()
    assert not (droot / "etc/edgefleet").exists()
    assert not (droot / "opt/edgefleet").exists()


def test_build_refuses_unknown_options() -> None:
    r = subprocess.run(["sh", str(PACKAGING / "deb" / "build.sh"), "--mode", "fat"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2 and "use full or app" in r.stderr
