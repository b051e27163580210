"""The update machine, table-driven: every state x every event, and a cut between every effect.

``step`` is pure, so the crash matrix of docs/agent-lifecycle.md is checked here without
processes: for every (state, event) the machine takes, the effects are cut after each
prefix (a kill -9 there), and what that prefix left on disk (the last persisted record and
the anti-rollback floor) must name a complete release, never none, and must be resumable
by the next start. The real kill -9 tests are in test_powercut.py.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import msgspec
import pytest

from agent.update import lifecycle as lc
from agent.update import machine as m
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target
from shared.telemetry.vocabulary import EventKind, ReasonCode, UpdateState

S = UpdateState
R0 = ReleaseRef(1, "0" * 64, "1.0")
R1 = ReleaseRef(2, "1" * 64, "2.0")
R2 = ReleaseRef(3, "2" * 64, "3.0")
TARGET = Target(R2.release, R2.digest, envelope_url="/e", blob_url="/b")
NOW = 1000.0
ROOT = Path(__file__).resolve().parents[2]


def record(state: UpdateState) -> ModelRecord:
    """A representative record of ``state``: updating from R1 (previous R0) to R2."""
    if state == S.IDLE:
        return ModelRecord(name="clf")
    if state == S.TRIAL:
        return ModelRecord(name="clf", state=state, target=TARGET, active=R2, previous=R1,
                           trial_until=NOW - 1, committed=R1)
    reason = "hash" if state == S.FAILED else "trial_errors" if state == S.ROLLED_BACK else None
    return ModelRecord(name="clf", state=state, target=TARGET, active=R1, previous=R0,
                       reason=reason, committed=R1)


EVENTS: list[m.Event] = [
    m.NewTarget(Target(4, "3" * 64, envelope_url="/e4", blob_url="/b4")),
    m.NewTarget(TARGET),
    m.EnvelopeVerified("models"),
    m.BlobsPlaced(),
    m.BlobsPlaced(frozenset({"4" * 64})),
    m.Damaged("1 file(s) missing or damaged"),
    m.Rechecked(),
    m.ActivationAllowed(),
    m.SmokePassed(R2, NOW + 10),
    m.SmokePassed(R2, None),
    m.Failed(ReasonCode.HASH, "a file's hash differs"),
    m.Failed(ReasonCode.DOWNLOAD, "connection reset"),
    m.Waiting("r3 waiting for the activation window 01:00-02:00 local time (device)"),
    m.WindowChanged("01:00-02:00"),
    m.TrialHealthy("error rate 0.000 (0/5 inferences), bound 0.5"),
    m.TrialFailed(ReasonCode.TRIAL_ERRORS, "error rate 1.000 (5/5 inferences), bound 0.5"),
    m.Restarted(max_restarts=0, trial_seconds=10),
    m.Restarted(max_restarts=2, trial_seconds=10),
    m.PreviousLoaded(ReasonCode.TRIAL_ERRORS, "error rate 1.000"),
    m.PreviousUnloadable(ReasonCode.RUNTIME_CRASH, "the agent stopped"),
    m.ActiveUnloadable(),
]
CASES = list(itertools.product(S, EVENTS))


def test_the_samples_cover_every_event_and_every_state_has_a_row() -> None:
    assert {type(e) for e in EVENTS} == set(m.Event.__subclasses__())
    assert set(m.ACCEPTS) == set(S)
    assert set(m.WORK_OF_STATE) == set(lc.IN_PROGRESS)


@pytest.mark.parametrize(("state", "event"), CASES, ids=[f"{s}-{type(e).__name__}" for s, e in CASES])
def test_every_state_and_event(state: UpdateState, event: m.Event) -> None:
    rec = record(state)
    leads = m.ACCEPTS[state]
    if type(event) not in leads:
        with pytest.raises(m.IllegalEvent) as err:
            m.step(rec, event, NOW)
        assert str(state) in str(err.value) and type(event).__name__ in str(err.value)
        return
    new, effects = m.step(rec, event, NOW)
    allowed = leads[type(event)]
    assert new.state == state if allowed is None else new.state in allowed
    assert rec == record(state), "step never changes its input"
    persisted = [e.record for e in effects if isinstance(e, m.Persist)]
    if new != rec:
        # the record changes only through Persist, and the last one persisted is the result
        assert persisted and persisted[-1] == new
    else:
        assert not persisted
    if new.state != state:
        assert lc.can_transition(state, new.state)
        assert new.updated == NOW
        # telemetry comes from the transition: entering a state announces it
        kind = lc.EVENT_OF_STATE.get(new.state)
        if kind is not None:
            assert kind in [e.kind for e in effects if isinstance(e, m.Emit)]
    if new.state in lc.NEEDS_REASON and new.state != state:
        assert new.reason in set(ReasonCode)
    for effect in effects:
        if isinstance(effect, m.Emit):
            assert isinstance(effect.kind, EventKind)
            assert effect.reason is None or isinstance(effect.reason, ReasonCode)
    # work comes last: the event it ends with follows every other effect of this step
    works = [i for i, e in enumerate(effects) if isinstance(e, m.Do)]
    assert works in ([], [len(effects) - 1])


def _disk_after_cut(rec: ModelRecord, effects: list[m.Effect], floor: tuple[int, str] | None,
                    cut: int) -> tuple[ModelRecord, tuple[int, str] | None]:
    on_disk = rec
    for effect in effects[:cut]:
        if isinstance(effect, m.Persist):
            on_disk = effect.record
        elif isinstance(effect, m.RaiseFloor) and (floor is None or floor[0] < effect.release):
            floor = (effect.release, effect.digest)
    return on_disk, floor


def _recover_floor(on_disk: ModelRecord, floor: tuple[int, str] | None) -> tuple[int, str] | None:
    """What Installer.recover does first: raise the floor to the active release."""
    if on_disk.active is not None and (floor is None or floor[0] < on_disk.active.release):
        return (on_disk.active.release, on_disk.active.digest)
    return floor


@pytest.mark.parametrize(("state", "event"), CASES, ids=[f"{s}-{type(e).__name__}" for s, e in CASES])
def test_a_cut_between_any_two_effects_leaves_a_valid_release(state: UpdateState, event: m.Event) -> None:
    rec = record(state)
    if type(event) not in m.ACCEPTS[state]:
        return
    _, effects = m.step(rec, event, NOW)
    floor0 = (rec.active.release, rec.active.digest) if rec.active else None
    known = {r.digest for r in (rec.active, rec.previous) if r is not None}
    if isinstance(event, m.SmokePassed):
        known.add(event.release.digest)  # placed, re-hashed and smoke-tested before this step
    for cut in range(len(effects) + 1):
        on_disk, floor = _disk_after_cut(rec, effects, floor0, cut)
        # never none: a device that served a release still names one; never an unknown one
        if rec.active is not None:
            assert on_disk.active is not None, (cut, effects[:cut])
            assert on_disk.active.digest in known
        if on_disk.previous is not None:
            assert on_disk.previous.digest in known | {R0.digest}
        # the next start repairs the floor and never lowers it
        repaired = _recover_floor(on_disk, floor)
        if on_disk.active is not None:
            assert repaired is not None and repaired[0] >= on_disk.active.release
        if floor is not None:
            assert repaired is not None and repaired[0] >= floor[0]
        # and it knows what to do with the state it finds
        if on_disk.state in lc.IN_PROGRESS:
            assert on_disk.target is not None and on_disk.state in m.WORK_OF_STATE
        elif on_disk.state == S.TRIAL:
            assert m.Restarted in m.ACCEPTS[S.TRIAL] and on_disk.active is not None


def test_activation_swaps_then_records_then_raises_the_floor() -> None:
    rec = record(S.SMOKE_TESTING)
    new, effects = m.step(rec, m.SmokePassed(R2, NOW + 10), NOW)
    kinds = [type(e).__name__ + (f":{e.kind}" if isinstance(e, m.Emit) else "") for e in effects]
    assert kinds == ["Emit:smoke_passed", "Swap", "Checkpoint", "Persist", "Checkpoint",
                     "RaiseFloor", "Emit:activated", "Checkpoint"]
    assert [e.name for e in effects if isinstance(e, m.Checkpoint)] == [
        "activating.swapped", "activating.recorded", "trial"]
    assert new.state == S.TRIAL and new.active == R2 and new.previous == R1
    assert new.trial_until == NOW + 10 and new.trial_restarts == 0 and new.attempts == 0
    offline, effects = m.step(rec, m.SmokePassed(R2, None), NOW)
    assert offline.state == S.COMMITTED and offline.committed == R2 and offline.trial_until is None
    assert [e.kind for e in effects if isinstance(e, m.Emit)] == [
        EventKind.SMOKE_PASSED, EventKind.ACTIVATED, EventKind.COMMITTED]


def test_files_proven_while_placed_go_to_recheck_in_memory_only() -> None:
    """BlobsPlaced names the files hashed whole while written; the RECHECK it asks for skips
    their second hash. The set lives in the Do effect, never in a persisted record, so the
    RECHECK a restart does in VERIFYING (WORK_OF_STATE) re-hashes every file."""
    proven = frozenset({"4" * 64, "5" * 64})
    new, effects = m.step(record(S.DOWNLOADING), m.BlobsPlaced(proven), NOW)
    assert new.state == S.VERIFYING
    assert effects[-1] == m.Do(m.Work.RECHECK, proven=proven)
    assert [e.name for e in effects if isinstance(e, m.Checkpoint)] == ["verifying"]
    saved = [e.record for e in effects if isinstance(e, m.Persist)]
    assert saved == [new] and "4444" not in msgspec.json.encode(saved[0]).decode()
    assert m.step(record(S.DOWNLOADING), m.BlobsPlaced(), NOW)[1][-1] == m.Do(m.Work.RECHECK)
    assert m.Do(m.WORK_OF_STATE[S.VERIFYING]).proven == frozenset()


def test_superseding_reports_the_old_target_then_starts_the_new() -> None:
    rec = record(S.VERIFYING)
    new_target = Target(4, "3" * 64, envelope_url="/e4", blob_url="/b4")
    new, effects = m.step(rec, m.NewTarget(new_target), NOW)
    emits = [e for e in effects if isinstance(e, m.Emit)]
    assert [(e.kind, e.release, e.reason) for e in emits] == [
        (EventKind.FAILED, TARGET.release, ReasonCode.SUPERSEDED),
        (EventKind.DOWNLOAD_STARTED, 4, ReasonCode.SUPERSEDED),
    ]
    assert new.state == S.DOWNLOADING and new.target == new_target and new.reason == "superseded"
    assert effects[-1] == m.Do(m.Work.FETCH)
    # the same target again (a resumed local file): no supersede, no reason
    again, effects = m.step(rec, m.NewTarget(TARGET), NOW)
    assert again.reason is None and [e.kind for e in effects if isinstance(e, m.Emit)] == [
        EventKind.DOWNLOAD_STARTED]


def test_failures_remember_refused_digests_and_count_retryable_ones() -> None:
    rec = msgspec.structs.replace(record(S.DOWNLOADING), attempts=2)
    refused, _ = m.step(rec, m.Failed(ReasonCode.SIGNATURE, "bad signature"), NOW)
    assert refused.failed_digests == [TARGET.digest] and refused.attempts == 0
    retry, _ = m.step(rec, m.Failed(ReasonCode.DISK_FULL, "full"), NOW)
    assert retry.failed_digests == [] and retry.attempts == 3


def test_restart_in_trial_is_counted_before_the_reload_and_ends_past_the_limit() -> None:
    rec = record(S.TRIAL)
    new, effects = m.step(rec, m.Restarted(max_restarts=1, trial_seconds=10), NOW)
    assert effects == [m.Persist(new), m.Do(m.Work.RELOAD_TRIAL)]
    assert new.trial_restarts == 1 and new.trial_until == NOW + 10
    same, effects = m.step(new, m.Restarted(max_restarts=1, trial_seconds=10), NOW)
    assert same == new and len(effects) == 1
    assert effects[0].work == m.Work.LOAD_PREVIOUS and effects[0].reason == ReasonCode.RUNTIME_CRASH
    back, effects = m.step(new, m.PreviousLoaded(ReasonCode.RUNTIME_CRASH, "stopped"), NOW)
    assert back.state == S.ROLLED_BACK and back.active == R1 and back.previous is None
    assert back.failed_digests == [R2.digest]
    assert [type(e) for e in effects] == [m.Swap, m.Persist, m.Emit]
    alone, _ = m.step(new, m.PreviousUnloadable(ReasonCode.RUNTIME_CRASH, "stopped"), NOW)
    assert alone.state == S.FAILED and alone.active == R2 and "still serving it" in alone.message


def test_architecture_doc_draws_the_machine_from_its_table() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- agent-update-machine -->\n```\n(.*?)```", doc, re.S)
    assert block is not None, "docs/architecture.md lacks the agent update machine's drawing"
    assert block.group(1).rstrip("\n") == m.drawing()
