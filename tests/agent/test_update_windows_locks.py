"""Activation windows, update locks, the last good release, and the best time for expiry
(issue 9): pure rules first, then the installer, then assembled agents over real HTTP."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.cli import cmd_status
from agent.client import AgentClient, AgentError
from agent.config import AgentConfig
from agent.main import Agent
from agent.update.clock import TrustedClock
from agent.update.gating import ActivationGate
from agent.update.lifecycle import UpdateState
from agent.update.locks import LockError, LockTable
from agent.update.window import UpdateWindow
from shared.bundle.keyring import Keyring
from shared.errors import ExpiredError, RollbackError

from .conftest import Bundles, make_rig, read_bundle
from .test_agent_fleet import StubFleet, agent_factory, fleet, wait_for  # noqa: F401

S = UpdateState


class FakeMono:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _window_around(now: datetime, *, inside: bool) -> str:
    """A one-hour window holding ``now`` (inside) or starting two hours later (outside)."""
    start = now - timedelta(minutes=30) if inside else now + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


# -- pure rules --------------------------------------------------------------------------


def test_window_seconds_until_open_wraps_midnight() -> None:
    w = UpdateWindow.parse("22:00-04:00")
    assert w.seconds_until_open(datetime(2026, 1, 1, 23, 0)) == 0
    assert w.seconds_until_open(datetime(2026, 1, 1, 3, 59)) == 0
    assert w.seconds_until_open(datetime(2026, 1, 1, 4, 0)) == 18 * 3600
    assert UpdateWindow.parse("02:00-05:00").seconds_until_open(datetime(2026, 1, 1, 1, 30)) == 1800


def test_lock_lease_expires_renew_release_and_bounds(tmp_path: Path) -> None:
    mono = FakeMono()
    released: list[int] = []
    table = LockTable(tmp_path, max_lease_s=60, clock=mono, boot_id="boot-a",
                      on_release=lambda: released.append(1))
    table.acquire("camera-app", 10, "recording")
    table.acquire("robot-arm", 30)
    assert [x.holder for x in table.held()] == ["robot-arm", "camera-app"]
    mono.t += 9
    table.renew("camera-app")  # a new lease of 10 s from now
    mono.t += 9
    assert {x.holder for x in table.held()} == {"camera-app", "robot-arm"}
    mono.t += 2  # camera-app's lease ran out
    assert [x.holder for x in table.held()] == ["robot-arm"]
    with pytest.raises(LockError) as err:
        table.renew("camera-app")
    assert err.value.status == 404 and err.value.code == "no_lock"
    table.release("robot-arm")
    assert table.held() == [] and released == [1]
    for holder, lease in (("camera-app", 61), ("camera-app", 0.5), ("../etc", 10), ("", 10)):
        with pytest.raises(LockError) as err:
            table.acquire(holder, lease)
        assert err.value.status == 400


def test_locks_survive_an_agent_restart_not_a_reboot(tmp_path: Path) -> None:
    mono = FakeMono()
    LockTable(tmp_path, clock=mono, boot_id="boot-a").acquire("camera-app", 100)
    mono.t += 40
    same_boot = LockTable(tmp_path, clock=mono, boot_id="boot-a").held()
    assert [x.holder for x in same_boot] == ["camera-app"]
    assert same_boot[0].remaining(mono.t) == pytest.approx(60)
    assert LockTable(tmp_path, clock=mono, boot_id="boot-b").held() == []


def test_best_time_is_max_of_system_and_fleet_time_advanced_by_monotonic(tmp_path: Path) -> None:
    wall, mono = FakeMono(1_800_000_000.0), FakeMono(500.0)
    clock = TrustedClock(tmp_path, wall=wall, monotonic=mono, boot_id="boot-a")
    assert clock.now_ts() == wall.t
    clock.observe(1_900_000_000.0)  # the system clock is far behind the fleet
    mono.t += 30
    assert clock.now_ts() == 1_900_000_030.0
    clock.observe(1_850_000_000.0)  # an older fleet time never moves it back
    assert clock.now_ts() == 1_900_000_030.0
    clock.observe("2031-03-01T00:00:00Z")  # ISO text, as in desired state
    t2030 = datetime(2031, 3, 1, tzinfo=UTC).timestamp()
    assert clock.now_ts() == t2030
    # Persisted: an agent restart in the same boot adds the monotonic time since.
    mono.t += 100
    assert TrustedClock(tmp_path, wall=wall, monotonic=mono, boot_id="boot-a").now_ts() == t2030 + 100
    # After a reboot the stored fleet time is a floor (the system clock reset to 1970 too).
    rebooted = TrustedClock(tmp_path, wall=lambda: 0.0, monotonic=FakeMono(5.0), boot_id="boot-b")
    assert rebooted.now_ts() == t2030
    # A later system clock wins.
    assert TrustedClock(tmp_path, wall=lambda: t2030 + 10**6, monotonic=mono,
                        boot_id="boot-b").now_ts() == t2030 + 10**6
    for junk in (None, "not a time", float("nan"), 12.0, True):
        clock.observe(junk)  # type: ignore[arg-type]


def test_gate_names_window_and_lock_holder() -> None:
    mono = FakeMono()
    locks = LockTable(None, clock=mono, boot_id="x")
    noon = datetime(2026, 1, 1, 12, 0)
    wall = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()
    gate = ActivationGate(window=UpdateWindow.parse("02:00-05:00"), locks=locks,
                          local_now=lambda: noon, wall_now=lambda: wall)
    assert gate.waiting_for() == "waiting for the activation window 02:00-05:00 local time (device)"
    assert gate.wake_in() == 14 * 3600
    # The rollout's window replaces the device's.
    assert gate.waiting_for("11:00-13:00") is None
    assert "(rollout)" in (gate.waiting_for("13:00-14:00") or "")
    locks.acquire("camera-app", 90)
    assert gate.waiting_for("11:00-13:00") == (
        "waiting for the update lock held by 'camera-app' until 12:01:30 UTC")
    assert gate.wake_in("11:00-13:00") == 90


# -- the installer ----------------------------------------------------------------------


def test_offline_grace_is_bounded_logged_and_never_relaxes_anti_rollback(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = bundles.build(5)
    expires = keyring.trust_root().verify_manifest(read_bundle(bundle)[0]).manifest.expires
    after = datetime.fromisoformat(expires.replace("Z", "+00:00")) + timedelta(days=2)
    strict = make_rig(tmp_path / "a", keyring, expiry_now=lambda: after)
    with pytest.raises(ExpiredError):
        strict.installer.install_file(bundle)
    short = make_rig(tmp_path / "b", keyring, expiry_now=lambda: after, offline_expiry_grace_s=86400)
    with pytest.raises(ExpiredError, match="offline grace of 86400 s"):
        short.installer.install_file(bundle)
    graced = make_rig(tmp_path / "c", keyring, expiry_now=lambda: after, offline_expiry_grace_s=3 * 86400)
    with caplog.at_level(logging.WARNING):
        rec = graced.installer.install_file(bundle)
    assert rec.state == S.COMMITTED and rec.active is not None and rec.active.release == 5
    assert "OFFLINE EXPIRY GRACE used" in caplog.text
    # Grace relaxes expiry only: an older release is still refused, and so is a bundle
    # signed by keys the device does not trust.
    with pytest.raises(RollbackError):
        graced.installer.install_file(bundles.build(4))
    # Fleet downloads (not offline) get no grace.
    with pytest.raises(ExpiredError):
        graced.installer._verify("clf", None, read_bundle(bundles.build(6))[0])


def test_gc_keeps_the_last_committed_release_when_a_trial_is_superseded(
    tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    rig = make_rig(tmp_path / "s", keyring)
    r1, r2, r3 = bundles.build(1, seed=0), bundles.build(2, seed=1), bundles.build(3, seed=2)
    rig.installer.install_file(r1)  # committed
    rig.installer.install_file(r2, trial=True)  # on trial, never committed
    rec = rig.installer.install_file(r3, trial=True)  # supersedes the trial
    assert rec.active.release == 3 and rec.previous.release == 2  # type: ignore[union-attr]
    assert rec.committed is not None and rec.committed.release == 1
    rig.installer.gc()
    blobs = rig.state_dir / "blobs" / "sha256"
    assert set(read_bundle(r1)[1]) <= {p.name for p in blobs.iterdir()}
    assert rig.installer.load_release("clf", rec.committed).release == 1
    assert rig.installer.held_releases() == {"clf": [1, 2, 3]}


# -- assembled agents over real HTTP ------------------------------------------------------


def _api(agent: Agent) -> AgentClient:
    host, port = agent.api.tcp_address  # type: ignore[union-attr, misc]
    return AgentClient(url=f"http://{host}:{port}", timeout=10)


def _rec(agent: Agent) -> Any:
    return agent.store.load("clf")


def _status(config: AgentConfig) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        cmd_status(config, False)
    return out.getvalue()


def test_rollout_window_waits_staged_across_a_restart_then_activates(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring  # noqa: F811
) -> None:
    fleet.desired = [fleet.publish(1, bundles.build(1), keyring)]
    agent = agent_factory()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED, what="r1 committed")
    closed = _window_around(datetime.now(), inside=False)
    fleet.desired = [{**fleet.publish(2, bundles.build(2, seed=1), keyring), "activation_window": closed}]
    agent.request_sync()
    rec = wait_for(lambda: (r := _rec(agent)) and r.state == S.STAGED and "waiting" in r.message and r,
                   what="r2 staged and waiting")
    assert rec.message == f"r2 staged, waiting for the activation window {closed} local time (rollout)"
    assert agent.host.get("clf").release == 1  # type: ignore[union-attr]
    assert agent.model_details()["clf"] == {"held": [1, 2], "waiting": rec.message}
    with _api(agent) as api:
        assert api.locks()["waiting"] == {"clf": rec.message}
    # The staged release survives a restart and still waits.
    agent.stop()
    agent = agent_factory()
    assert agent.host.get("clf").release == 1  # type: ignore[union-attr]
    time.sleep(0.5)
    assert _rec(agent).state == S.STAGED
    assert f"r2 staged, waiting for the activation window {closed}" in _status(agent.config)
    n = len([r for r in fleet.requests if "/blobs/" in r])
    # The window opens (the rollout moves it to now): activated at once, nothing downloaded again.
    fleet.desired = [{**fleet.desired[0], "activation_window": _window_around(datetime.now(), inside=True)}]
    agent.request_sync()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED and r.active.release == 2,
             what="r2 committed")
    assert len([r for r in fleet.requests if "/blobs/" in r]) == n


def test_update_lock_holds_activation_until_released_or_expired(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring  # noqa: F811
) -> None:
    fleet.desired = [fleet.publish(1, bundles.build(1), keyring)]
    agent = agent_factory()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED, what="r1 committed")
    with _api(agent) as api:
        lease = api.acquire_lock("camera-app", 120, "recording a clip")
        assert lease["holder"] == "camera-app" and 119 < lease["expires_in_s"] <= 120
        api.acquire_lock("ui", 120)
        fleet.desired = [fleet.publish(2, bundles.build(2, seed=1), keyring)]
        agent.request_sync()
        rec = wait_for(lambda: (r := _rec(agent)) and r.state == S.STAGED and "lock" in r.message and r,
                       what="r2 waiting for the lock")
        assert "waiting for the update lock held by 'ui' until" in rec.message
        assert "'camera-app' until" in rec.message
        assert "waiting for the update lock held by" in _status(agent.config)
        assert [x["holder"] for x in api.locks()["locks"]] == ["ui", "camera-app"]
        api.release_lock("ui")
        api.renew_lock("camera-app", 60)
        time.sleep(0.5)
        assert _rec(agent).state == S.STAGED and agent.host.get("clf").release == 1  # type: ignore[union-attr]
        api.release_lock("camera-app")  # the first allowed moment: at once
        wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED and r.active.release == 2,
                 what="r2 committed after release")
        with pytest.raises(AgentError) as err:
            api.release_lock("camera-app")
        assert err.value.status == 404 and err.value.code == "no_lock"
        with pytest.raises(AgentError) as err:
            api.acquire_lock("camera-app", 10**6)
        assert err.value.status == 400 and err.value.code == "bad_lease"

        # A crashed application: its lease runs out by itself and the update goes on.
        api.acquire_lock("crashy", 1.5)
        fleet.desired = [fleet.publish(3, bundles.build(3, seed=2), keyring)]
        agent.request_sync()
        wait_for(lambda: (r := _rec(agent)) and r.state == S.STAGED and r.target.release == 3,
                 what="r3 waiting")
        wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED and r.active.release == 3,
                 what="r3 committed after the lease expired")
        with pytest.raises(AgentError) as err:
            api.renew_lock("crashy")
        assert err.value.code == "no_lock"


def test_fleet_rollback_to_a_held_release_downloads_nothing(
    fleet: StubFleet, agent_factory: Callable[..., Agent], bundles: Bundles, keyring: Keyring  # noqa: F811
) -> None:
    good = bundles.build(1, seed=0)
    fleet.desired = [fleet.publish(1, good, keyring)]
    agent = agent_factory()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED, what="r1 committed")
    fleet.desired = [fleet.publish(2, bundles.build(2, seed=1), keyring)]
    agent.request_sync()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED and r.active.release == 2,
             what="r2 committed")
    assert agent.model_details()["clf"]["held"] == [1, 2]
    # The fleet rolls back: the r1 files re-issued as r3 (same files, new number and digest).
    reissue = bundles.build(3, seed=0)
    assert set(read_bundle(reissue)[1]) == set(read_bundle(good)[1])
    stats = agent.installer.fetcher.stats  # type: ignore[union-attr]
    before, blob_gets = stats.network, len([r for r in fleet.requests if "/blobs/" in r])
    fleet.desired = [fleet.publish(3, reissue, keyring)]
    agent.request_sync()
    wait_for(lambda: (r := _rec(agent)) and r.state == S.COMMITTED and r.active.release == 3,
             what="r3 committed")
    assert stats.network == before
    assert len([r for r in fleet.requests if "/blobs/" in r]) == blob_gets
    assert any("/bundles/3/envelope" in r for r in fleet.requests)
