"""The agent's (session, seq): a session survives restarts with its counter, and a counter that
starts over (state wiped, or unreadable) starts a new session, so (session, seq) never repeats."""

from __future__ import annotations

from pathlib import Path

from agent.telemetry.sequence import SESSION_CHARS, SeqCounter


def test_session_survives_a_restart_and_changes_when_the_counter_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "telemetry_seq.json"
    first = SeqCounter(path)
    assert len(first.session) == SESSION_CHARS and int(first.session, 16) >= 0
    assert [first.next(), first.next()] == [0, 1]
    first.close()

    again = SeqCounter(path)
    assert (again.session, again.next()) == (first.session, 2)
    again.close()

    path.unlink()  # a wiped state directory: numbers start over, in a new session
    wiped = SeqCounter(path)
    assert wiped.next() == 0 and wiped.session != first.session

    path.write_text("{not json")  # unreadable: numbers continue from the clock, new session
    unreadable = SeqCounter(path)
    assert unreadable.next() > 1_000_000 and unreadable.session not in (first.session, wiped.session)


def test_a_counter_file_of_an_older_agent_gets_a_session(tmp_path: Path) -> None:
    path = tmp_path / "telemetry_seq.json"
    path.write_text('{"reserved": 5000}')
    counter = SeqCounter(path)
    assert counter.next() == 5000 and len(counter.session) == SESSION_CHARS
