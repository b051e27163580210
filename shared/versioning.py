"""Agent version comparison for a manifest's ``min_agent_version``."""

from __future__ import annotations

import re

from shared.errors import MalformedDocumentError

_VERSION = re.compile(r"^([0-9]+)\.([0-9]+)\.([0-9]+)\Z")


def parse_version(value: str) -> tuple[int, int, int]:
    match = _VERSION.match(value)
    if not match:
        raise MalformedDocumentError(f"version {value!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch
