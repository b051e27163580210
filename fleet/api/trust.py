"""The trust-root chain, served to devices so they follow a rotation online.

The fleet only relays: it reads ``keys_dir/roots/N.root.json`` (written by
``edgefleet keys rotate`` / ``keys delegate``) and hands out the envelopes byte for byte.
It is not trusted for them: a device accepts root N+1 only when a threshold of root N's
keys and of its own signed it (shared.bundle.trust.TrustRoot.rotate).
"""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

from litestar import Controller, get
from litestar.datastructures import State
from litestar.params import FromQuery

from fleet.api.auth import device_guard
from fleet.api.context import AppContext
from fleet.api.schemas import DEVICE_RESPONSES
from shared.bundle.trust import MAX_ROOT_BYTES
from shared.contract.enrollment import RootsPage
from shared.errors import MalformedDocumentError

log = logging.getLogger(__name__)

ROOT_FILE_RE = re.compile(r"^([1-9][0-9]{0,8})\.root\.json$")
MAX_ROOTS_PER_PAGE = 16  # so one answer stays below 16 x 256 KiB (x 4/3 for base64)


def root_versions(keys_dir: Path | None) -> dict[int, Path]:
    """Version -> file of every root in ``keys_dir/roots`` (empty without keys)."""
    if keys_dir is None:
        return {}
    try:
        names = [p for p in (keys_dir / "roots").iterdir() if p.is_file()]
    except OSError:
        return {}
    out = {}
    for path in names:
        m = ROOT_FILE_RE.match(path.name)
        if m:
            out[int(m.group(1))] = path
    return out


def newest_root_version(keys_dir: Path | None) -> int | None:
    """The newest root the fleet can serve; None when it holds no chain."""
    versions = root_versions(keys_dir)
    return max(versions) if versions else None


def roots_page(keys_dir: Path | None, after: int) -> RootsPage:
    """Roots after ``after``, contiguous from after+1, at most MAX_ROOTS_PER_PAGE of them."""
    versions = root_versions(keys_dir)
    latest = max(versions, default=0)
    roots: list[str] = []
    version = after + 1
    while version in versions and len(roots) < MAX_ROOTS_PER_PAGE:
        data = versions[version].read_bytes()
        if len(data) > MAX_ROOT_BYTES:
            log.error("%s is %d bytes, over the %d bytes of a root; not served",
                      versions[version], len(data), MAX_ROOT_BYTES)
            break
        roots.append(base64.b64encode(data).decode("ascii"))
        version += 1
    return RootsPage(latest=latest, roots=roots)


class TrustController(Controller):
    path = "/api/v1/trust"
    tags = ["trust"]

    @get(
        "/roots",
        guards=[device_guard],
        sync_to_thread=True,
        summary="Trust roots newer than `after`, for a device to walk its pinned root forward",
        description="Device credential. `roots` holds base64 of each root envelope with a version "
        f"above `after`, in order, exactly as signed (at most {MAX_ROOTS_PER_PAGE} per answer: ask "
        "again with the last version while it is below `latest`). The device verifies every link "
        "against the root it holds; the fleet is not trusted for them.",
        responses=DEVICE_RESPONSES,
    )
    def roots(self, state: State, after: FromQuery[int] = 0) -> RootsPage:
        ctx: AppContext = state.ctx
        if not 0 <= after < 10**9:
            raise MalformedDocumentError(f"after={after} must be between 0 and 999999999")
        return roots_page(ctx.settings.keys_dir, after)

