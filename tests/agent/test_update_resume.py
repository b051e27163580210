"""Restart safety of each lifecycle step, in process: trial restarts, the activation's two
writes, damaged blobs found while verifying, a stop in the middle of a download."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.update.lifecycle import UpdateState, transition
from agent.update.store import ANTIROLLBACK_FILE
from fleet.demo.models import golden_inputs
from shared.bundle.keyring import Keyring

from .conftest import Bundles, make_rig, read_bundle, verified
from .test_update_disk import padded_bundle, target
from .test_update_fetch import FAST, RangeFleet, fetcher, running_fleet

S = UpdateState
X = golden_inputs(batch=2, seed=7)["x"]


@pytest.fixture
def range_fleet() -> Iterator[RangeFleet]:
    yield from running_fleet()


def test_trial_goes_on_after_restarts_up_to_the_limit_then_rolls_back(
    tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    state = tmp_path / "s"
    rig = make_rig(state, keyring, trial_max_restarts=2)
    rig.installer.install_file(bundles.build(1))
    rig.installer.install_file(bundles.build(2, seed=1), trial=True)
    for n in (1, 2):  # a power cut during the trial, twice: the trial goes on
        fresh = make_rig(state, keyring, trial_max_restarts=2)
        assert fresh.installer.recover() == []
        rec = fresh.installer.store.load("clf")
        assert rec is not None and rec.state == S.TRIAL and rec.trial_restarts == n
        assert fresh.host.get("clf").release == 2  # type: ignore[union-attr]
        assert f"({n} of 2)" in rec.message
    third = make_rig(state, keyring, trial_max_restarts=2)
    third.installer.recover()
    rec = third.installer.store.load("clf")
    assert rec is not None and rec.state == S.ROLLED_BACK and rec.reason == "runtime_crash"
    assert "3 time(s), trial_max_restarts 2" in rec.message
    assert third.host.get("clf").release == 1  # type: ignore[union-attr]
    assert rec.target is not None and rec.target.digest in rec.failed_digests


def test_crash_between_record_and_anti_rollback_is_repaired_on_start(
    tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    state = tmp_path / "s"
    rig = make_rig(state, keyring, trial_max_restarts=1)
    rig.installer.install_file(bundles.build(1))
    before = (state / ANTIROLLBACK_FILE).read_bytes()
    rig.installer.install_file(bundles.build(2, seed=1), trial=True)
    assert rig.installer.store.highest("clf")[0] == 2  # type: ignore[index]
    (state / ANTIROLLBACK_FILE).write_bytes(before)  # as if killed before the second write
    fresh = make_rig(state, keyring, trial_max_restarts=1)
    fresh.installer.recover()
    assert fresh.installer.store.highest("clf")[0] == 2  # type: ignore[index]
    assert fresh.host.get("clf").release == 2  # type: ignore[union-attr]


def test_damaged_blob_found_while_verifying_is_fetched_again(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    state = tmp_path / "s"
    rig = make_rig(state, keyring, fetcher=fetcher())
    rig.installer.install_file(bundles.build(1))
    bundle = bundles.build(2, seed=1)
    entry = range_fleet.publish(2, bundle)
    vm = verified(bundle, keyring)
    # Downloaded and placed, record VERIFYING; then the model blob is damaged on disk.
    rig.installer.blobs.save_envelope("clf", 2, vm.digest, vm.envelope)
    for sha, data in read_bundle(bundle)[1].items():
        with rig.installer.blobs.open_staging(sha) as fh:
            fh.write(data)
        rig.installer.blobs.commit(sha)
    rec = rig.installer.store.load("clf")
    assert rec is not None
    for st in (S.DOWNLOADING, S.VERIFYING):
        rec = transition(rec, st, target=target(range_fleet, entry))
    rig.installer.store.save(rec)
    model = state / "blobs" / "sha256" / vm.manifest.files["model"].sha256
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    fresh = make_rig(state, keyring, fetcher=fetcher())
    assert fresh.installer.recover() == ["clf"]
    done = fresh.installer.resume("clf")
    assert done is not None and done.state == S.TRIAL and fresh.host.get("clf").release == 2  # type: ignore[union-attr]
    assert [s.path.rsplit("/", 1)[1] for s in range_fleet.served if "/blobs/" in s.path] == [
        vm.manifest.files["model"].sha256]


def test_stop_mid_download_keeps_the_record_and_the_partial_then_resumes(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    state = tmp_path / "s"
    bundle = padded_bundle(tmp_path, keyring, 2, pad=1 << 20)
    sha = verified(bundle, keyring).manifest.files["model"].sha256
    entry = range_fleet.publish(2, bundle)
    range_fleet.faults.rate_bps = 2_000_000
    cancel = threading.Event()
    from agent.update.fetch import Fetcher

    slow = Fetcher(httpx.Client(), lambda: {"Authorization": "Bearer t"}, policy=FAST, cancel=cancel)
    rig = make_rig(state, keyring, fetcher=slow)
    rig.installer.install_file(bundles.build(1))
    t = threading.Thread(target=rig.installer.apply_target, args=("clf", target(range_fleet, entry)))
    t.start()
    deadline = time.monotonic() + 10
    while rig.installer.blobs.partial_size(sha) < 200_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    cancel.set()
    t.join(10)
    rec = rig.installer.store.load("clf")
    assert rec is not None and rec.state == S.DOWNLOADING, "a stop is not a failure"
    kept = rig.installer.blobs.partial_size(sha)
    assert kept >= 200_000

    range_fleet.faults.rate_bps = None
    fresh = make_rig(state, keyring, fetcher=fetcher())
    assert fresh.installer.recover() == ["clf"]
    done = fresh.installer.resume("clf")
    assert done is not None and done.state == S.TRIAL
    assert range_fleet.blob_requests(sha)[-1].range == f"bytes={kept}-"


def test_retry_pause_doubles_up_to_its_bound(tmp_path: Path, keyring: Keyring) -> None:
    rig = make_rig(tmp_path / "s", keyring, retry_failed_s=30, retry_failed_max_s=100)
    from agent.update.lifecycle import ModelRecord

    pauses = [rig.installer.retry_pause(ModelRecord("clf", attempts=n)) for n in range(5)]
    assert pauses == [0, 30, 60, 100, 100]
