"""A shadow candidate is a second record in the update machine: staged over real HTTP with
real signatures and onnxruntime, served beside the active release, never swapped in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.shadow import ShadowPolicy
from agent.update.lifecycle import Target, UpdateState
from agent.update.shadow_stage import ShadowStager, ShadowTarget
from shared.bundle.keyring import Keyring

from .conftest import Bundles, Rig, make_rig
from .test_update_fetch import RangeFleet, fetcher, running_fleet

S = UpdateState
POLICY = ShadowPolicy(sample_rate=0.5, max_busy_fraction=0.25)


@pytest.fixture
def range_fleet() -> Iterator[RangeFleet]:
    yield from running_fleet()


def shadow_of(fleet: RangeFleet, bundle_id: int, bundle: Path) -> ShadowTarget:
    e = fleet.publish(bundle_id, bundle)
    return ShadowTarget(Target(e["release"], e["digest"], fleet.url + e["envelope_url"],
                               fleet.url + e["blob_url"]), POLICY)


@pytest.fixture
def serving(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> Rig:
    rig = make_rig(tmp_path / "state", keyring, fetcher=fetcher())
    rig.installer.install_file(bundles.build(1))
    rig.events.clear()
    return rig


def test_a_candidate_runs_beside_the_active_release_and_changes_nothing_else(
    serving: Rig, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    rig = serving
    before = rig.installer.store.load("clf")
    stager = ShadowStager(rig.installer)
    want = shadow_of(range_fleet, 2, bundles.build(2, seed=1))
    stager.sync({"clf": want})

    shadow = rig.host.shadow("clf")
    assert shadow is not None and shadow.digest == want.target.digest
    assert rig.host.get("clf").release == 1  # type: ignore[union-attr]
    assert rig.installer.store.load("clf") == before, "the model's record is left alone"
    assert rig.installer.store.highest("clf")[0] == 1  # type: ignore[index]
    # its own record went through the machine, in memory
    cand = stager.records["clf"]
    assert cand.state == S.TRIAL and cand.active is not None and cand.active.release == 2
    # of its events the fleet sees verified and staged, both marked as the shadow's
    assert [(e[1], e[2], e[3]) for e in rig.events] == [("verified", 2, 1), ("staged", 2, 1)]
    assert rig.events[0][5].startswith("shadow candidate, signed by delegation")
    assert rig.events[1][5] == "shadow: r2 runs beside r1 on 0.5 of requests (CPU budget 0.25)"

    stager.sync({})
    assert rig.host.shadow("clf") is None and "clf" not in stager.records


def test_a_refused_candidate_reports_once_and_is_not_fetched_again(
    serving: Rig, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    rig = serving
    stager = ShadowStager(rig.installer)
    want = shadow_of(range_fleet, 3, bundles.build(1, seed=3))  # release 1 again, other digest
    stager.sync({"clf": want})
    assert rig.host.shadow("clf") is None and "clf" not in stager.records
    assert [(e[1], e[4]) for e in rig.events] == [("failed", "rollback")]
    assert rig.events[0][5].startswith("shadow: ")
    assert rig.installer.store.load("clf").state == S.COMMITTED  # type: ignore[union-attr]
    served = len(range_fleet.served)
    stager.sync({"clf": want})
    assert len(range_fleet.served) == served and len(rig.events) == 1
