"""The agent's systemd unit: its Documentation= is a file the .deb ships, and reload is SIGHUP
(what the agent answers: tests/agent/test_sighup.py)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "edgefleet-agent.service"


def test_documentation_points_at_a_shipped_file() -> None:
    unit = UNIT.read_text()
    docs = re.findall(r"^Documentation=(.+)$", unit, re.M)
    assert docs, "no Documentation= line"
    build = (REPO / "packaging" / "deb" / "build.sh").read_text()
    for uri in docs[0].split():
        m = re.fullmatch(r"file:///usr/share/doc/edgefleet-agent/([\w.-]+)", uri)
        assert m, f"{uri}: not in the package's doc directory"
        name = m.group(1)
        assert (REPO / "docs" / name).is_file(), f"docs/{name} does not exist"
        assert f'"$repo/docs/{name}" "$stage/usr/share/doc/edgefleet-agent/"' in build, (
            f"packaging/deb/build.sh does not ship docs/{name}")


def test_reload_sends_sighup() -> None:
    assert "ExecReload=/bin/kill -HUP $MAINPID" in UNIT.read_text().splitlines()
