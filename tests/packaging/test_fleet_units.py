"""The fleet's systemd units name only what the documented install step
(packaging/systemd/install-fleet.sh, docs/install.md) creates: the virtualenv of ExecStart,
the user, the environment file, the documentation file."""

from __future__ import annotations

import re

import pytest

from .conftest import PACKAGING

REPO = PACKAGING.parent
SCRIPT = PACKAGING / "systemd" / "install-fleet.sh"
UNITS = ("edgefleet-fleet.service", "edgefleet-fleet@.service")


def _field(unit: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.+)$", (PACKAGING / "systemd" / unit).read_text(), re.M)


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_names_what_the_install_step_makes(unit: str) -> None:
    script = SCRIPT.read_text()
    venv = re.search(r"^venv=(\S+)$", script, re.M).group(1)  # type: ignore[union-attr]
    binary = _field(unit, "ExecStart")[0].split()[0]
    assert binary == f"{venv}/bin/edgefleet", f"{unit} runs {binary}; the install step makes {venv}"
    assert '"$venv/bin/pip" install' in script and '"$repo[fleet]"' in script
    user = _field(unit, "User")[0]
    assert re.search(rf"useradd .*\n?.* {user}$", script, re.M), f"the install step makes no user {user}"
    for env_file in _field(unit, "EnvironmentFile"):
        path = env_file.lstrip("-").replace("%i", "")
        if path.endswith("fleet.env"):
            assert "/etc/edgefleet/fleet.env" in script
        else:
            assert env_file.startswith("-"), f"{unit}: {env_file} is optional or made by the install step"
    for uri in _field(unit, "Documentation")[0].split():
        m = re.fullmatch(r"file:///usr/share/doc/edgefleet-fleet/([\w.-]+)", uri)
        assert m, uri
        assert (REPO / "docs" / m.group(1)).is_file() and f'"$repo/docs/{m.group(1)}"' in script
    assert f'"$repo/packaging/systemd/{unit}"' in script


def test_docs_name_the_install_step() -> None:
    assert "packaging/systemd/install-fleet.sh" in (REPO / "docs" / "install.md").read_text()
