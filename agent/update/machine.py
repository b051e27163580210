"""The update machine: ``step(record, event, now) -> (record, effects)``. Pure: no I/O.

An event says what happened to a model's update (the fleet desires a target, the blobs are
placed, the smoke test passed, the trial is due, ...); ``step`` answers the record that
follows and the effects to perform, in order. The runner (agent.update.runner) performs each
effect (persist the record, emit a telemetry event, swap the serving session, raise the
anti-rollback floor, do a piece of I/O work) and feeds the event a piece of work ends with
back into ``step``; the installer (agent.update.installer) holds the entry points that start
a run. Telemetry events come only from here.

    NewTarget ──> DOWNLOADING ──EnvelopeVerified──> (emit verified) ──BlobsPlaced──> VERIFYING
                      ^                                                                 │
                      └─────────────────────────── Damaged ──────────────── Rechecked ──┤
                                                                                        v
    SMOKE_TESTING <──────────────────── ActivationAllowed ────────────────────────── STAGED
         │  SmokePassed: emit smoke_passed, swap, persist, raise floor, emit activated
         ├──────────────> TRIAL ──TrialHealthy──> COMMITTED
         │                  │ TrialFailed / Restarted past the limit: load previous
         │                  ├──PreviousLoaded──> ROLLED_BACK (swap previous)
         │                  └──PreviousUnloadable──> FAILED (still serving it)
         └─ offline install ─> COMMITTED
    Failed(reason) in DOWNLOADING..SMOKE_TESTING ──> FAILED; NewTarget from any state.

Rules:
- ``ACCEPTS`` is the one table of which event each state takes and where it may lead; a
  state change also passes ``lifecycle.transition`` (the table of legal state pairs);
- an event a state does not take raises ``IllegalEvent`` (the runner's bug, never a guess);
- the order of effects is the crash-safety order of docs/agent-lifecycle.md: on activation
  swap (memory), then persist the record, then raise the floor; ``Checkpoint`` marks the
  named points between effects where the power-cut tests cut;
- ``Waiting``, ``WindowChanged``, ``Restarted`` and ``ActiveUnloadable`` change the record
  without changing its state; they too are persisted only through a ``Persist`` effect.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from agent.update import lifecycle as lc
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target
from shared.telemetry.vocabulary import RETRYABLE_REASONS, EventKind, ReasonCode, UpdateState

S = UpdateState
MAX_FAILED_DIGESTS = 32


# -- events: what happened ------------------------------------------------------------------

class Event(msgspec.Struct, frozen=True, tag=True):
    pass


class NewTarget(Event, frozen=True):
    """The fleet desires ``target``, or an operator installs a bundle file."""

    target: Target


class EnvelopeVerified(Event, frozen=True):
    """The target's envelope verified (signatures, scope, expiry, policy) and was stored."""

    delegation: str


class BlobsPlaced(Event, frozen=True):
    """Every file of the target is placed in the blob store. ``proven``: the sha256 of the
    files this process wrote and hashed whole while placing them (RECHECK skips their second
    hash); a placed file not in it (kept from before, or any file after a restart) is re-hashed."""

    proven: frozenset[str] = frozenset()


class Damaged(Event, frozen=True):
    """Re-checking found the stored envelope missing or a placed file damaged."""

    what: str


class Rechecked(Event, frozen=True):
    """The stored envelope verified again and every placed file re-hashed right."""


class ActivationAllowed(Event, frozen=True):
    """The activation window is open and no update lock is held (or the install is offline)."""


class SmokePassed(Event, frozen=True):
    """A new session of the target passed its golden vectors; ``trial_until`` None: commit."""

    release: ReleaseRef
    trial_until: float | None


class Failed(Event, frozen=True):
    """A step of an update in progress failed."""

    reason: ReasonCode
    message: str


class Waiting(Event, frozen=True):
    """The update waits (metered link, activation window, update lock): noted in the message."""

    message: str


class WindowChanged(Event, frozen=True):
    """The fleet changed the activation window of the target in progress."""

    activation_window: str | None


class TrialHealthy(Event, frozen=True):
    message: str


class TrialFailed(Event, frozen=True):
    reason: ReasonCode
    message: str


class Restarted(Event, frozen=True):
    """The agent started and found this record on trial (a crash or power cut)."""

    max_restarts: int
    trial_seconds: float


class PreviousLoaded(Event, frozen=True):
    """Leaving a failed trial: the previous release is loaded again (not yet serving)."""

    reason: ReasonCode
    message: str


class PreviousUnloadable(Event, frozen=True):
    """Leaving a failed trial without a previous release to go back to."""

    reason: ReasonCode
    message: str


class ActiveUnloadable(Event, frozen=True):
    """At a start the active release cannot be loaded and the previous one serves instead."""


# -- effects: what to do ------------------------------------------------------------------

class Work(StrEnum):
    """I/O the runner does for a state; each ends with the event named after the arrow."""

    FETCH = "fetch"  # verify the envelope before any big byte, store it -> EnvelopeVerified
    FETCH_BLOBS = "fetch_blobs"  # free space, fetch or extract the missing files -> BlobsPlaced
    RECHECK = "recheck"  # re-verify the envelope, re-hash every file not proven -> Rechecked | Damaged
    AWAIT_ACTIVATION = "await_activation"  # window and locks -> ActivationAllowed | Waiting
    SMOKE = "smoke"  # load a new session, golden vectors -> SmokePassed
    RELOAD_TRIAL = "reload_trial"  # load the release on trial again -> nothing | TrialFailed
    LOAD_PREVIOUS = "load_previous"  # -> PreviousLoaded | PreviousUnloadable


# The work a restart does again for a persisted in-progress state (every step is idempotent).
WORK_OF_STATE: dict[UpdateState, Work] = {
    S.DOWNLOADING: Work.FETCH,
    S.VERIFYING: Work.RECHECK,
    S.STAGED: Work.AWAIT_ACTIVATION,
    S.SMOKE_TESTING: Work.SMOKE,
}


class Effect(msgspec.Struct, frozen=True, tag=True):
    pass


class Persist(Effect, frozen=True):
    record: ModelRecord


class Emit(Effect, frozen=True):
    kind: EventKind
    release: int
    from_release: int | None
    reason: ReasonCode | None = None
    message: str = ""


class Do(Effect, frozen=True):
    work: Work
    # For LOAD_PREVIOUS: why the trial ends (echoed in the event the work ends with).
    reason: ReasonCode | None = None
    message: str = ""
    # For RECHECK: the files proven while placed in this run (BlobsPlaced.proven); never
    # persisted, so the RECHECK a restart does (WORK_OF_STATE) re-hashes every file.
    proven: frozenset[str] = frozenset()


class Swap(Effect, frozen=True):
    """Serve ``release`` (the session SMOKE or LOAD_PREVIOUS loaded); memory only."""

    release: ReleaseRef


class RaiseFloor(Effect, frozen=True):
    release: int
    digest: str


class Checkpoint(Effect, frozen=True):
    """A named point between two effects (agent.update.testhooks pauses here in tests)."""

    name: str


Effects = list[Effect]

# -- the one table: the events each state takes, and the states each may lead to -------------

IN_PROGRESS = lc.IN_PROGRESS
# None: the event keeps the state (it changes the record or starts work).
_NOTES: dict[type[Event], frozenset[UpdateState] | None] = {
    Waiting: None, ActiveUnloadable: None, NewTarget: frozenset({S.DOWNLOADING}),
}
ACCEPTS: dict[UpdateState, dict[type[Event], frozenset[UpdateState] | None]] = {
    S.IDLE: {**_NOTES},
    S.DOWNLOADING: {**_NOTES, EnvelopeVerified: None, BlobsPlaced: frozenset({S.VERIFYING}),
                    Failed: frozenset({S.FAILED}), WindowChanged: None},
    S.VERIFYING: {**_NOTES, Rechecked: frozenset({S.STAGED}), Damaged: frozenset({S.DOWNLOADING}),
                  Failed: frozenset({S.FAILED}), WindowChanged: None},
    S.STAGED: {**_NOTES, ActivationAllowed: frozenset({S.SMOKE_TESTING}),
               Failed: frozenset({S.FAILED}), WindowChanged: None},
    S.SMOKE_TESTING: {**_NOTES, SmokePassed: frozenset({S.TRIAL, S.COMMITTED}),
                      Failed: frozenset({S.FAILED}), WindowChanged: None},
    S.TRIAL: {**_NOTES, TrialHealthy: frozenset({S.COMMITTED}), TrialFailed: None,
              Restarted: None, PreviousLoaded: frozenset({S.ROLLED_BACK}),
              PreviousUnloadable: frozenset({S.FAILED})},
    S.COMMITTED: {**_NOTES},
    S.ROLLED_BACK: {**_NOTES},
    S.FAILED: {**_NOTES},
}


class IllegalEvent(Exception):
    def __init__(self, model: str, state: UpdateState, event: Event) -> None:
        takes = ", ".join(sorted(e.__name__ for e in ACCEPTS[state]))
        super().__init__(f"{model}: {state} does not take {type(event).__name__} (takes: {takes})")
        self.state = state
        self.event = event


def drawing() -> str:
    """The table, one line per state (docs/architecture.md holds this text; a test checks it)."""

    def row(events: dict[type[Event], frozenset[UpdateState] | None]) -> str:
        moves = [f"{e.__name__} -> {' | '.join(str(s).upper() for s in sorted(to))}"
                 for e, to in events.items() if to is not None]
        stays = [e.__name__ for e, to in events.items() if to is None]
        return "; ".join([*moves, *([", ".join(stays) + ": same state"] if stays else [])])

    lines = [f"{'every state':<14} {row(_NOTES)}"]
    for state, events in ACCEPTS.items():
        own = {e: to for e, to in events.items() if e not in _NOTES}
        lines.append(f"{str(state).upper():<14} {row(own) if own else '(only the above)'}")
    return "\n".join(lines)


# -- step -----------------------------------------------------------------------------------

def _active_release(rec: ModelRecord) -> int | None:
    return rec.active.release if rec.active else None


def _to(rec: ModelRecord, to: UpdateState, now: float, *, reason: str | None = None,
        message: str = "", **kw: object) -> ModelRecord:
    if to == S.COMMITTED and "committed" not in kw:
        kw["committed"] = kw.get("active", rec.active)
    return lc.transition(rec, to, now=now, reason=reason, message=message, **kw)


def step(rec: ModelRecord, event: Event, now: float) -> tuple[ModelRecord, Effects]:
    """The record after ``event`` and the effects to perform, in order; raise IllegalEvent."""
    leads = ACCEPTS[rec.state]
    if type(event) not in leads:
        raise IllegalEvent(rec.name, rec.state, event)
    new, effects = _step(rec, event, now)
    allowed = leads[type(event)]
    assert (new.state == rec.state) if allowed is None else (new.state in allowed), (rec.state, event)
    return new, effects


def _step(rec: ModelRecord, ev: Event, now: float) -> tuple[ModelRecord, Effects]:
    target = rec.target
    if isinstance(ev, NewTarget):
        return _new_target(rec, ev.target, now)
    if isinstance(ev, Waiting):
        if rec.message == ev.message:
            return rec, []
        new = msgspec.structs.replace(rec, message=ev.message)
        return new, [Persist(new)]
    if isinstance(ev, WindowChanged):
        assert target is not None
        if target.activation_window == ev.activation_window:
            return rec, []
        new = msgspec.structs.replace(
            rec, target=msgspec.structs.replace(target, activation_window=ev.activation_window))
        return new, [Persist(new)]
    if isinstance(ev, ActiveUnloadable):
        new = msgspec.structs.replace(
            rec, active=rec.previous, previous=None,
            message=f"active r{rec.active.release if rec.active else '?'} failed to load")
        return new, [Persist(new)]
    if isinstance(ev, Restarted):
        return _restarted(rec, ev, now)
    if isinstance(ev, TrialFailed):
        return rec, [Do(Work.LOAD_PREVIOUS, ev.reason, ev.message)]
    if isinstance(ev, (PreviousLoaded, PreviousUnloadable)):
        return _leave_trial(rec, ev, now)
    if isinstance(ev, TrialHealthy):
        new = _to(rec, S.COMMITTED, now, message=ev.message, trial_until=None)
        return new, [Persist(new),
                     Emit(EventKind.COMMITTED, new.active.release if new.active else 0,
                          new.previous.release if new.previous else None, None, ev.message)]
    assert target is not None
    if isinstance(ev, Failed):
        failed = list(rec.failed_digests)
        if ev.reason not in RETRYABLE_REASONS and target.digest not in failed:
            failed = [*failed, target.digest][-MAX_FAILED_DIGESTS:]
        attempts = rec.attempts + 1 if ev.reason in RETRYABLE_REASONS else 0
        new = _to(rec, S.FAILED, now, reason=ev.reason, message=ev.message, failed_digests=failed,
                  trial_until=None, attempts=attempts)
        return new, [Persist(new), Emit(EventKind.FAILED, target.release, _active_release(rec),
                                        ev.reason, ev.message)]
    if isinstance(ev, EnvelopeVerified):
        return rec, [Emit(EventKind.VERIFIED, target.release, _active_release(rec), None,
                          f"signed by delegation {ev.delegation}"),
                     Checkpoint("downloading"), Do(Work.FETCH_BLOBS)]
    if isinstance(ev, BlobsPlaced):
        new = _to(rec, S.VERIFYING, now)
        return new, [Persist(new), Checkpoint("verifying"), Do(Work.RECHECK, proven=ev.proven)]
    if isinstance(ev, Damaged):
        new = _to(rec, S.DOWNLOADING, now, message=ev.what)
        return new, [Persist(new), Emit(EventKind.DOWNLOAD_STARTED, target.release,
                                        _active_release(rec), None, ev.what), Do(Work.FETCH)]
    if isinstance(ev, Rechecked):
        new = _to(rec, S.STAGED, now)
        return new, [Persist(new), Emit(EventKind.STAGED, target.release, _active_release(rec)),
                     Checkpoint("staged"), Do(Work.AWAIT_ACTIVATION)]
    if isinstance(ev, ActivationAllowed):
        new = _to(rec, S.SMOKE_TESTING, now)
        return new, [Persist(new), Checkpoint("smoke_testing"), Do(Work.SMOKE)]
    assert isinstance(ev, SmokePassed)
    return _activate(rec, ev, now)


def _new_target(rec: ModelRecord, target: Target, now: float) -> tuple[ModelRecord, Effects]:
    effects: Effects = []
    old = rec.target
    superseding = (rec.state in (S.TRIAL, *IN_PROGRESS) and old is not None
                   and old.digest != target.digest)
    if superseding:
        assert old is not None
        effects.append(Emit(EventKind.FAILED, old.release, _active_release(rec),
                            ReasonCode.SUPERSEDED, "the fleet desires another release"))
    same = old is not None and old.digest == target.digest
    reason = ReasonCode.SUPERSEDED if superseding and rec.state in IN_PROGRESS else None
    new = _to(rec, S.DOWNLOADING, now, reason=reason, target=target,
              attempts=rec.attempts if same else 0)
    effects += [Persist(new), Emit(EventKind.DOWNLOAD_STARTED, target.release,
                                   _active_release(rec), reason), Do(Work.FETCH)]
    return new, effects


def _activate(rec: ModelRecord, ev: SmokePassed, now: float) -> tuple[ModelRecord, Effects]:
    """Swap (memory), then the record (active/previous), then the anti-rollback floor."""
    ref = ev.release
    previous = rec.active if rec.active and rec.active.digest != ref.digest else rec.previous
    from_release = _active_release(rec)
    trial = ev.trial_until is not None
    new = _to(rec, S.TRIAL if trial else S.COMMITTED, now, active=ref, previous=previous, attempts=0,
              trial_restarts=0, trial_until=ev.trial_until)
    effects: Effects = [
        Emit(EventKind.SMOKE_PASSED, ref.release, from_release),
        Swap(ref), Checkpoint("activating.swapped"),
        Persist(new), Checkpoint("activating.recorded"),
        RaiseFloor(ref.release, ref.digest),
        Emit(EventKind.ACTIVATED, ref.release, from_release, None, f"version {ref.version}"),
    ]
    if trial:
        effects.append(Checkpoint("trial"))
    else:
        effects.append(Emit(EventKind.COMMITTED, ref.release, from_release, None, "manual install"))
    return new, effects


def _restarted(rec: ModelRecord, ev: Restarted, now: float) -> tuple[ModelRecord, Effects]:
    """Count the restart and persist it BEFORE loading the release again (no crash loop)."""
    assert rec.active is not None
    if rec.trial_restarts >= ev.max_restarts:
        return rec, [Do(Work.LOAD_PREVIOUS, ReasonCode.RUNTIME_CRASH,
                        f"the agent stopped while r{rec.active.release} was on trial "
                        f"({rec.trial_restarts + 1} time(s), trial_max_restarts {ev.max_restarts})")]
    new = msgspec.structs.replace(
        rec, trial_restarts=rec.trial_restarts + 1, trial_until=now + ev.trial_seconds,
        message=f"trial restarted after the agent stopped ({rec.trial_restarts + 1} of "
                f"{ev.max_restarts})", updated=now,
    )
    return new, [Persist(new), Do(Work.RELOAD_TRIAL)]


def _leave_trial(rec: ModelRecord, ev: PreviousLoaded | PreviousUnloadable,
                 now: float) -> tuple[ModelRecord, Effects]:
    assert rec.active is not None and rec.target is not None
    bad = rec.active
    failed = [*(d for d in rec.failed_digests if d != bad.digest), bad.digest][-MAX_FAILED_DIGESTS:]
    if isinstance(ev, PreviousLoaded):
        assert rec.previous is not None
        back = rec.previous
        new = _to(rec, S.ROLLED_BACK, now, reason=ev.reason, message=ev.message, active=back,
                  previous=None, trial_until=None, failed_digests=failed)
        return new, [Swap(back), Persist(new), Emit(EventKind.ROLLED_BACK, back.release,
                                                   bad.release, ev.reason, ev.message)]
    message = ev.message + "; no previous release to roll back to, still serving it"
    new = _to(rec, S.FAILED, now, reason=ev.reason, message=message, trial_until=None,
              failed_digests=failed)
    return new, [Persist(new), Emit(EventKind.FAILED, rec.target.release, bad.release,
                                    ev.reason, message)]
