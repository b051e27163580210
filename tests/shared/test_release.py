"""Release numbers: one range everywhere, and the builder's default numbering (ledger)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from fleet.bundles.ledger import LedgerError, ReleaseLedger
from shared.errors import MalformedDocumentError
from shared.release import (
    MAX_RELEASE,
    MIN_RELEASE,
    ReleaseNotAboveError,
    ReleaseRangeError,
    check_explicit_release,
    next_release,
    validate_release,
)


@pytest.mark.parametrize(
    "value", [MIN_RELEASE, 7, 1_765_000_000, 1_765_000_000_123, 3_000_000_000, MAX_RELEASE]
)
def test_range_accepts(value: int) -> None:
    assert validate_release(value) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0, "release 0 is out of range; release numbers are 1 .. 9007199254740991"),
        (-1, "release -1 is out of range"),
        (MAX_RELEASE + 1, f"release {MAX_RELEASE + 1} is out of range"),
        (True, "release True is not an integer"),
        (1.5, "release 1.5 is not an integer"),
        ("5", "release '5' is not an integer"),
    ],
)
def test_range_refuses_with_the_bounds(value: object, fragment: str) -> None:
    with pytest.raises(ReleaseRangeError, match=fragment) as info:
        validate_release(value)
    assert isinstance(info.value, MalformedDocumentError)  # a manifest with it is malformed
    assert info.value.details["max"] == MAX_RELEASE


def test_next_release_is_time_in_ms_or_above_the_highest() -> None:
    now_ms = 1_765_000_000_000
    assert next_release(now_ms) == now_ms
    assert next_release(now_ms, known_highest=now_ms - 5) == now_ms
    # the clock is behind the last release: still one above it
    assert next_release(now_ms, known_highest=now_ms + 10_000) == now_ms + 10_001
    # old second-based numbers stay below millisecond ones
    assert next_release(now_ms, known_highest=1_765_000_000) == now_ms


def test_explicit_release_must_be_above_what_is_known() -> None:
    assert check_explicit_release(13, 12, model="detector", source="ledger") == 13
    with pytest.raises(ReleaseNotAboveError) as info:
        check_explicit_release(12, 12, model="detector", source="fleet http://f: r12 (1.2.0)")
    err = info.value
    assert err.code == "rollback"
    assert "detector release 12 is not above release 12 already issued (fleet http://f: r12 (1.2.0))" in (
        str(err)
    )
    assert "Use --release 13 or higher" in str(err)


def test_ledger_numbers_grow_within_one_millisecond(tmp_path: Path) -> None:
    ledger = ReleaseLedger(tmp_path / "releases.json")
    got = [ledger.reserve("detector", now_ms=1_000) for _ in range(30)]
    assert got == list(range(1_000, 1_030))
    assert ledger.highest("detector") == 1_029
    assert ledger.highest("other") == 0
    # the clock went back an hour: numbers still grow
    assert ledger.reserve("detector", now_ms=1_000 - 3_600_000) == 1_030


def test_ledger_explicit_release_refused_when_not_above(tmp_path: Path) -> None:
    ledger = ReleaseLedger(tmp_path / "releases.json")
    assert ledger.reserve("detector", now_ms=0, explicit=40) == 40
    with pytest.raises(ReleaseNotAboveError, match="release 40 is not above release 40 already issued"):
        ledger.reserve("detector", now_ms=0, explicit=40)
    with pytest.raises(ReleaseNotAboveError, match=r"not above release 90 .*fleet http://x: r90"):
        ledger.reserve("detector", now_ms=0, explicit=50, fleet_highest=90,
                       fleet_source="fleet http://x: r90")
    assert ledger.highest("detector") == 40  # refusals reserve nothing
    assert ledger.reserve("detector", now_ms=0, fleet_highest=90) == 91


def _reserve_many(path: str, n: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ledger = ReleaseLedger(Path(path))
    out.put([ledger.reserve("detector", now_ms=5) for _ in range(n)])


def test_ledger_parallel_builds_never_share_a_number(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_reserve_many, args=(str(tmp_path / "r.json"), 20, out)) for _ in range(4)]
    for p in procs:
        p.start()
    numbers = [n for _ in procs for n in out.get(timeout=30)]
    for p in procs:
        p.join(10)
    assert len(numbers) == 80 and len(set(numbers)) == 80
    assert ReleaseLedger(tmp_path / "r.json").highest("detector") == max(numbers)


def test_ledger_that_is_not_json_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "releases.json"
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="is not JSON"):
        ReleaseLedger(path).reserve("detector", now_ms=1)
    path.write_text('{"detector": -4}')
    with pytest.raises(LedgerError, match="must map model names to release numbers"):
        ReleaseLedger(path).highest("detector")


@pytest.mark.parametrize(("release", "ok"), [(MAX_RELEASE, True), (3_000_000_000, True), (0, False),
                                             (MAX_RELEASE + 1, False)])
def test_the_agent_takes_the_same_range_from_the_fleet(tmp_path: Path, release: int, ok: bool) -> None:
    """The desired state the fleet sends: a release outside the range is a malformed document."""
    import json

    import httpx

    from agent.fleet_client import FleetClient

    with httpx.Client() as http:
        fc = FleetClient(url="http://fleet", device_id="d1", enrollment_token="t", labels={},
                         state_dir=tmp_path, client=http)
        body = json.dumps({"device_id": "d1", "generation": 1, "models": [{
            "name": "clf", "release": release, "digest": "a" * 64, "bundle_id": 1,
            "envelope_url": "/e", "blob_url": "/b/{sha256}"}]}).encode()
        if ok:
            assert fc.parse_desired(body).models[0].release == release
        else:
            with pytest.raises(MalformedDocumentError, match=f"desired entry 'clf' r{release} is malformed"):
                fc.parse_desired(body)
