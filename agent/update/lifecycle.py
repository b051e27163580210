"""The per-model update lifecycle: states, the one table of legal transitions, the record.

Pure: no I/O. The machine (agent.update.machine) decides every change of the record
and moves states only through ``transition`` below; the installer runs its effects and
the store persists the record after every step, so after a restart the record is the truth.

                     new target (desired by the fleet, or a local bundle file)
    IDLE / COMMITTED / ROLLED_BACK / FAILED ─────────────────────┐
                                                                  v
      ┌──────────────────────────── superseded ─────────── DOWNLOADING  envelope fetched and
      │                                                           │       verified first, then blobs
      │                                                           v
      │                                                      VERIFYING    every blob present, policy
      │                                                           │       re-checked (restart-safe)
      │                                                           v
      │                                                        STAGED
      │                                                           │
      │                                                           v
      │                                                    SMOKE_TESTING  load in a new session,
      │                                                           │       golden vectors
      │                                       activate (swap)     v
      │                   ┌───────────────────────────────────  TRIAL ── errors / crash ──> ROLLED_BACK
      │                   │  offline install: commit at once      │      (previous re-activated)
      │                   v                                       v
      │               COMMITTED <──────── trial healthy ──────────┘
      │
      └─ any step from DOWNLOADING to SMOKE_TESTING may end in FAILED (reason code);
         the active model is untouched until TRIAL. TRIAL ends in FAILED only when
         there is no previous release to go back to (the device keeps serving).

Rules:
- FAILED and ROLLED_BACK always carry a reason from REASON_CODES;
- a release becomes active only by SMOKE_TESTING -> TRIAL or -> COMMITTED;
- DOWNLOADING may restart from any in-progress state or TRIAL when the fleet desires
  another release (reason "superseded"), and VERIFYING goes back to it when a placed
  blob no longer hashes right;
- every in-progress step is idempotent: a restart re-enters the persisted state and
  does its work again (docs/agent-lifecycle.md has the crash matrix).
"""

from __future__ import annotations

import time

import msgspec

from shared.telemetry.vocabulary import REASON_CODES, EventKind, UpdateState

S = UpdateState

# The only place transitions are defined.
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    S.IDLE: frozenset({S.DOWNLOADING}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.FAILED, S.DOWNLOADING}),
    S.VERIFYING: frozenset({S.STAGED, S.FAILED, S.DOWNLOADING}),
    S.STAGED: frozenset({S.SMOKE_TESTING, S.FAILED, S.DOWNLOADING}),
    S.SMOKE_TESTING: frozenset({S.TRIAL, S.COMMITTED, S.FAILED, S.DOWNLOADING}),
    S.TRIAL: frozenset({S.COMMITTED, S.ROLLED_BACK, S.FAILED, S.DOWNLOADING}),
    S.COMMITTED: frozenset({S.DOWNLOADING}),
    S.ROLLED_BACK: frozenset({S.DOWNLOADING}),
    S.FAILED: frozenset({S.DOWNLOADING}),
}

# States in which an update is under way; a restart resumes them.
IN_PROGRESS = frozenset({S.DOWNLOADING, S.VERIFYING, S.STAGED, S.SMOKE_TESTING})
# States that must name why they were entered.
NEEDS_REASON = frozenset({S.FAILED, S.ROLLED_BACK})
# The telemetry event each state announces when it is entered.
EVENT_OF_STATE: dict[UpdateState, EventKind] = {
    S.DOWNLOADING: EventKind.DOWNLOAD_STARTED,
    S.STAGED: EventKind.STAGED,
    S.TRIAL: EventKind.ACTIVATED,
    S.COMMITTED: EventKind.COMMITTED,
    S.ROLLED_BACK: EventKind.ROLLED_BACK,
    S.FAILED: EventKind.FAILED,
}


class IllegalTransition(Exception):
    def __init__(self, model: str, current: UpdateState, to: UpdateState) -> None:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing"
        super().__init__(f"{model}: {current} -> {to} is not a legal transition (allowed: {allowed})")
        self.current = current
        self.to = to


class ReleaseRef(msgspec.Struct, frozen=True):
    release: int
    digest: str
    version: str = ""


class Target(msgspec.Struct, frozen=True):
    """What an update installs: a release of the fleet (URLs) or of a local bundle file."""

    release: int
    digest: str
    envelope_url: str | None = None
    blob_url: str | None = None
    bundle_path: str | None = None
    # The rollout's activation window ("HH:MM-HH:MM" device local time), if it set one.
    activation_window: str | None = None


class ModelRecord(msgspec.Struct, frozen=True):
    name: str
    state: UpdateState = S.IDLE
    target: Target | None = None
    active: ReleaseRef | None = None
    previous: ReleaseRef | None = None
    reason: str | None = None
    message: str = ""
    failed_digests: list[str] = msgspec.field(default_factory=list)
    trial_until: float | None = None
    updated: float = 0.0
    # Starts of the agent that found this record in TRIAL (a crash or power cut during the
    # trial); past the installer's trial_max_restarts the trial rolls back (runtime_crash).
    trial_restarts: int = 0
    # Consecutive retryable failures (download, disk_full) of this target; spaces the retries.
    attempts: int = 0
    # The release that last reached COMMITTED (proved healthy): cleanup never removes it.
    committed: ReleaseRef | None = None


def can_transition(current: UpdateState, to: UpdateState) -> bool:
    return to in TRANSITIONS[current]


def transition(
    record: ModelRecord,
    to: UpdateState,
    *,
    reason: str | None = None,
    message: str = "",
    now: float | None = None,
    **changes: object,
) -> ModelRecord:
    """Return ``record`` moved to ``to`` (with ``changes`` applied), or raise IllegalTransition."""
    if not can_transition(record.state, to):
        raise IllegalTransition(record.name, record.state, to)
    if reason is not None and reason not in REASON_CODES:
        raise ValueError(f"reason {reason!r} is not one of {REASON_CODES}")
    if to in NEEDS_REASON and reason is None:
        raise ValueError(f"{record.name}: entering {to} needs a reason code")
    return msgspec.structs.replace(
        record,
        state=to,
        reason=reason,
        message=message,
        updated=time.time() if now is None else now,
        **changes,
    )
