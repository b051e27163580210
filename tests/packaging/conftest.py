"""Helpers for the packaging tests: tools from Debian packages, the repository root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def tool(name: str, package: str) -> str:
    """The path of ``name``, or skip naming the Debian package that provides it."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed: apt-get install {package} (Debian package '{package}'); "
                    "make deps-system installs what the tests need")
    return found


@pytest.fixture
def repo() -> Path:
    return REPO
