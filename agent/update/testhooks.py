"""TEST-ONLY pause points in the update lifecycle, for the power-cut tests.

``EDGEFLEET_TEST_PAUSE_AT=step[,step...]`` (read once, when this module is imported)
makes the update worker stop at a named step: it appends ``<step> <pid>`` to the file
named by ``EDGEFLEET_TEST_PAUSE_FILE`` (if set), logs a warning, and sleeps for
``EDGEFLEET_TEST_PAUSE_S`` seconds (default 60) before going on. The test SIGKILLs the
process while it sleeps, so the kill lands exactly between two persisted writes.

Steps (see docs/agent-lifecycle.md): ``downloading`` (envelope stored, blobs not yet
fetched), ``verifying``, ``staged``, ``smoke_testing`` (each: record persisted in that
state, work not done), ``activating.swapped`` (new session serving in memory, record
still SMOKE_TESTING), ``activating.recorded`` (record TRIAL/COMMITTED written,
anti-rollback not raised yet), ``trial`` (activation complete, trial running).

Never set these variables on a device: the agent would stall its updates.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "EDGEFLEET_TEST_PAUSE_FILE"
PAUSE_SECONDS_ENV = "EDGEFLEET_TEST_PAUSE_S"

STEPS = frozenset({
    "downloading", "verifying", "staged", "smoke_testing",
    "activating.swapped", "activating.recorded", "trial",
})

_PAUSE_AT = frozenset(s.strip() for s in os.environ.get(PAUSE_ENV, "").split(",") if s.strip())
_PAUSE_FILE = os.environ.get(PAUSE_FILE_ENV, "")
_PAUSE_S = float(os.environ.get(PAUSE_SECONDS_ENV, "60") or 60)
if _PAUSE_AT:
    log.warning("TEST HOOK %s=%s is set: updates pause at these steps",
                PAUSE_ENV, ",".join(sorted(_PAUSE_AT)))


def pause_point(step: str) -> None:
    """Pause here when the test asked for ``step``; a no-op otherwise."""
    if step not in _PAUSE_AT:
        return
    log.warning("TEST HOOK: pausing at %s for %.0f s (pid %d)", step, _PAUSE_S, os.getpid())
    if _PAUSE_FILE:
        with open(_PAUSE_FILE, "a") as fh:
            fh.write(f"{step} {os.getpid()}\n")
    time.sleep(_PAUSE_S)
