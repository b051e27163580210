"""The pure lifecycle state machine: every pair of states, legal or not."""

from __future__ import annotations

import itertools

import pytest

from agent.update.lifecycle import (
    IN_PROGRESS,
    NEEDS_REASON,
    TRANSITIONS,
    IllegalTransition,
    ModelRecord,
    Target,
    UpdateState,
    can_transition,
    transition,
)
from shared.telemetry.messages import REASON_CODES

S = UpdateState
LEGAL = {
    (S.IDLE, S.DOWNLOADING),
    (S.DOWNLOADING, S.VERIFYING), (S.DOWNLOADING, S.FAILED), (S.DOWNLOADING, S.DOWNLOADING),
    (S.VERIFYING, S.STAGED), (S.VERIFYING, S.FAILED), (S.VERIFYING, S.DOWNLOADING),
    (S.STAGED, S.SMOKE_TESTING), (S.STAGED, S.FAILED), (S.STAGED, S.DOWNLOADING),
    (S.SMOKE_TESTING, S.TRIAL), (S.SMOKE_TESTING, S.COMMITTED), (S.SMOKE_TESTING, S.FAILED),
    (S.SMOKE_TESTING, S.DOWNLOADING),
    (S.TRIAL, S.COMMITTED), (S.TRIAL, S.ROLLED_BACK), (S.TRIAL, S.FAILED), (S.TRIAL, S.DOWNLOADING),
    (S.COMMITTED, S.DOWNLOADING), (S.ROLLED_BACK, S.DOWNLOADING), (S.FAILED, S.DOWNLOADING),
}


def record(state: UpdateState) -> ModelRecord:
    return ModelRecord(name="clf", state=state, target=Target(1, "a" * 64))


@pytest.mark.parametrize(("current", "to"), list(itertools.product(S, S)))
def test_every_pair(current: UpdateState, to: UpdateState) -> None:
    reason = "load" if to in NEEDS_REASON else None
    if (current, to) in LEGAL:
        assert can_transition(current, to)
        new = transition(record(current), to, reason=reason, now=5.0)
        assert new.state == to and new.reason == reason and new.updated == 5.0
    else:
        assert not can_transition(current, to)
        with pytest.raises(IllegalTransition) as err:
            transition(record(current), to, reason=reason)
        assert str(current) in str(err.value) and str(to) in str(err.value)


def test_table_is_the_documented_one() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    assert set(TRANSITIONS) == set(S)


def test_failed_and_rolled_back_need_a_known_reason() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        transition(record(S.DOWNLOADING), S.FAILED)
    with pytest.raises(ValueError, match="needs a reason"):
        transition(record(S.TRIAL), S.ROLLED_BACK)
    with pytest.raises(ValueError, match="not one of"):
        transition(record(S.DOWNLOADING), S.FAILED, reason="because")
    for code in REASON_CODES:
        assert transition(record(S.STAGED), S.FAILED, reason=code).reason == code


def test_activation_only_from_smoke_testing() -> None:
    activating = {a for a, targets in TRANSITIONS.items() if S.TRIAL in targets}
    assert activating == {S.SMOKE_TESTING}
    assert {a for a, t in TRANSITIONS.items() if S.COMMITTED in t} == {S.SMOKE_TESTING, S.TRIAL}


def test_every_state_reachable_and_every_update_can_start_again() -> None:
    seen, frontier = {S.IDLE}, [S.IDLE]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(S)
    for state in S:
        assert can_transition(state, S.DOWNLOADING) or state in IN_PROGRESS - {S.DOWNLOADING}


def test_changes_are_applied_and_record_is_not_mutated() -> None:
    rec = record(S.TRIAL)
    new = transition(rec, S.COMMITTED, message="ok", trial_until=None)
    assert rec.state == S.TRIAL and new.state == S.COMMITTED and new.message == "ok"
