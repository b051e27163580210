"""The persisted records and anti-rollback: atomic writes, fail-closed reads, one owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import StateError
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target, UpdateState
from agent.update.store import StateStore

DIGEST = "ab" * 32


def test_record_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    rec = ModelRecord(
        name="clf", state=UpdateState.TRIAL, target=Target(3, DIGEST, envelope_url="http://x/e"),
        active=ReleaseRef(3, DIGEST, "1.3"), previous=ReleaseRef(2, "cd" * 32, "1.2"),
        reason=None, failed_digests=["ef" * 32], trial_until=12.5,
    )
    store.save(rec)
    assert store.load("clf") == rec
    assert store.load_all() == {"clf": rec}
    assert store.load("other") is None
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["clf.json"]


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"name": "clf", "state": "exploded"}', b"[]"])
def test_corrupt_record_fails_closed(tmp_path: Path, garbage: bytes) -> None:
    store = StateStore(tmp_path)
    store.save(ModelRecord(name="clf"))
    (tmp_path / "models" / "clf.json").write_bytes(garbage)
    with pytest.raises(StateError, match="corrupt"):
        store.load("clf")
    with pytest.raises(StateError):
        store.load_all()


def test_record_under_wrong_name_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(ModelRecord(name="clf"))
    (tmp_path / "models" / "clf.json").rename(tmp_path / "models" / "det.json")
    with pytest.raises(StateError, match="'clf'"):
        store.load("det")


def test_antirollback_only_rises_and_survives_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.highest("clf") is None
    store.raise_highest("clf", 5, DIGEST)
    store.raise_highest("clf", 3, "cd" * 32)
    assert StateStore(tmp_path).highest("clf") == (5, DIGEST)
    store.raise_highest("clf", 7, "cd" * 32)
    assert StateStore(tmp_path).highest("clf") == (7, "cd" * 32)


def test_corrupt_antirollback_is_not_reset(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.raise_highest("clf", 5, DIGEST)
    (tmp_path / "antirollback.json").write_bytes(b'{"clf": [5')
    with pytest.raises(StateError, match="anti-rollback"):
        store.highest("clf")
    with pytest.raises(StateError):
        store.raise_highest("clf", 9, DIGEST)
    assert (tmp_path / "antirollback.json").read_bytes() == b'{"clf": [5'


def test_one_process_owns_the_state_dir(tmp_path: Path) -> None:
    a, b = StateStore(tmp_path), StateStore(tmp_path)
    a.acquire()
    with pytest.raises(StateError, match="another edgefleet-agent"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
