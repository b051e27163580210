"""The rollout controller with gates, approval, inconclusive handling, silent and rolled-back
devices, late enrollment and a restart, on SQLite and PostgreSQL: ``tick(now)`` is driven
with an explicit clock and telemetry rows are injected as the ingester would write them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from fleet_support import admin, bearer, enroll, make_bundle, upload
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session, select

from fleet.app import create_app
from fleet.db.models import Device, DeviceEvent, GateEvaluation, HealthReport
from fleet.ingest.apply import drift
from fleet.rollout.controller import RolloutController
from fleet.rollout.health_buckets import add_health
from fleet.settings import Settings
from shared.bundle.keyring import Keyring
from shared.telemetry.messages import ModelHealth

Client = TestClient[Any]
MODEL = "detector"


class Fleet:
    """A fleet under test with its own clock: reports and ticks happen at ``T0 + seconds``."""

    def __init__(self, client: Client, keyring: Keyring, tmp_path: Path) -> None:
        self.client = client
        self.keyring = keyring
        self.tmp = tmp_path
        self.t0 = datetime.now(UTC).replace(microsecond=0)
        self.creds: dict[str, str] = {}
        self.seq = 0

    @property
    def ctrl(self) -> RolloutController:
        return self.client.app.state.ctx.controller  # type: ignore[no-any-return]

    def at(self, seconds: float) -> datetime:
        return self.t0 + timedelta(seconds=seconds)

    def enroll(self, *devices: str, **labels: str) -> None:
        for d in devices:
            self.creds[d] = enroll(self.client, d, site="lab", **labels)

    def bundle(self, release: int) -> int:
        r = upload(self.client, make_bundle(self.tmp / f"r{release}", self.keyring, release=release).path)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def rollout(self, bundle_id: int, stages: list[dict[str, Any]], *, at: float = 0, **over: Any) -> int:
        body = {"name": f"bundle {bundle_id}", "bundle_id": bundle_id, "selector": {"site": "lab"}}
        r = self.client.post("/api/v1/rollouts", json={**body, "stages": stages, **over}, headers=admin())
        assert r.status_code == 201, r.text
        rid = int(r.json()["id"])
        self.ctrl.start(rid, now=self.at(at))
        return rid

    def health(
        self,
        device: str,
        release: int,
        at: float,
        inferences: int = 0,
        errors: int = 0,
        state: str = "committed",
        **extra: Any,
    ) -> None:
        with Session(self.client.app.state.ctx.engine) as s:
            dev = s.get(Device, device)
            assert dev is not None
            dev.models = {**dev.models, MODEL: {"release": release, "version": "x", "state": state}}
            dev.online, dev.last_seen = True, self.at(at)
            s.add(dev)
            if inferences:
                self.seq += 1
                report = HealthReport(
                    device_id=device,
                    ts=self.at(at).timestamp(),
                    received_at=self.at(at),
                    seq=self.seq,
                    model=MODEL,
                    release=release,
                    inferences=inferences,
                    errors=errors,
                    **extra,
                )
                s.add(report)
                add_health(s, [report.model_dump()])  # the ingester's buckets, as it writes them
            s.commit()

    def event(self, device: str, kind: str, release: int, at: float, **extra: Any) -> None:
        self.seq += 1
        with Session(self.client.app.state.ctx.engine) as s:
            s.add(
                DeviceEvent(
                    device_id=device,
                    ts=self.at(at).timestamp(),
                    received_at=self.at(at),
                    seq=self.seq,
                    model=MODEL,
                    kind=kind,
                    release=release,
                    **extra,
                )
            )
            s.commit()

    def offline(self, device: str, at: float) -> None:
        with Session(self.client.app.state.ctx.engine) as s:
            dev = s.get(Device, device)
            assert dev is not None
            dev.online, dev.last_seen = False, self.at(at)
            s.add(dev)
            s.commit()

    def tick(self, at: float) -> Any:
        return self.ctrl.tick(self.at(at))

    def status(self, rid: int) -> Any:
        r = self.client.get(f"/api/v1/rollouts/{rid}", headers=admin())
        assert r.status_code == 200, r.text
        return r.json()

    def desired(self, device: str) -> dict[str, int]:
        d = self.client.get(f"/api/v1/devices/{device}/desired", headers=bearer(self.creds[device])).json()
        return {m["name"]: m["release"] for m in d["models"]}

    def op(self, rid: int, name: str) -> Any:
        return self.client.post(f"/api/v1/rollouts/{rid}/{name}", headers=admin())


@pytest.fixture
def fleet(client: Client, keyring: Keyring, tmp_path: Path) -> Fleet:
    return Fleet(client, keyring, tmp_path)


CANARY = {"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1, "bake_seconds": 60}
ALL = {"name": "all", "percent": 100, "bake_seconds": 0}
ERRORS = {"max_error_rate": 0.05, "min_inferences": 100}


def labels_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def gate_metrics(f: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = f.client.get("/metrics")
    assert r.status_code == 200, r.text
    return {
        (s.name, labels_key(s.labels)): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name.startswith("edgefleet_rollout_gate_")
    }


def two_rings(f: Fleet) -> None:
    f.enroll("c1", ring="canary")
    f.enroll("m1", "m2", ring="main")


def devices_of(status: Any) -> dict[str, Any]:
    return {d["device_id"]: d for d in status["devices"]}


def test_a_device_counts_once_committed_not_activated(fleet: Fleet) -> None:
    two_rings(fleet)
    rid = fleet.rollout(fleet.bundle(1), [CANARY, ALL], gates=ERRORS)
    fleet.event("c1", "download_started", 1, at=1)
    fleet.tick(2)
    assert devices_of(fleet.status(rid))["c1"]["progress"] == "downloading"
    fleet.event("c1", "activated", 1, at=3)
    fleet.health("c1", 1, at=70, inferences=200, state="trial")
    fleet.tick(71)
    s = fleet.status(rid)
    assert s["current_stage"] == 0 and devices_of(s)["c1"]["progress"] == "trial"
    assert "0 of 1 devices report r1 committed (1 trial)" in s["last_evaluation"]
    fleet.event("c1", "committed", 1, at=72)
    fleet.tick(73)
    s = fleet.status(rid)
    assert s["current_stage"] == 1, s["last_evaluation"]
    assert devices_of(s)["c1"]["progress"] == "committed" and s["stages"][0]["committed"] == 1
    assert devices_of(s)["m1"]["progress"] == "assigned" and devices_of(s)["m1"]["assigned_at"]


def test_gate_evaluations_are_stored_and_shown(fleet: Fleet) -> None:
    two_rings(fleet)
    rid = fleet.rollout(fleet.bundle(1), [CANARY, ALL], gates=ERRORS)
    fleet.health("c1", 1, at=5, inferences=40)
    fleet.tick(6)
    fleet.tick(7)  # same status, within the record interval: not stored again
    # Prometheus: the running rollout's gates with their figures (any fleet process, from the db)
    labels = {"rollout": str(rid), "stage": "canary", "gate": "max_error_rate"}
    m = gate_metrics(fleet)
    assert (m[("edgefleet_rollout_gate_sample", labels_key(labels))],
            m[("edgefleet_rollout_gate_min_sample", labels_key(labels))],
            m[("edgefleet_rollout_gate_threshold", labels_key(labels))],
            m[("edgefleet_rollout_gate_failing", labels_key(labels))]) == (40, 100, 0.05, 0)
    fleet.health("c1", 1, at=8, inferences=372, errors=128)
    fleet.tick(9)
    s = fleet.status(rid)
    assert s["state"] == "rolled_back"
    assert not [k for k in gate_metrics(fleet) if dict(k[1]).get("rollout") == str(rid)]  # ended: gone
    assert s["reason"].startswith(
        "stage canary: error_rate 0.31 > 0.05 over 412 inferences on 1 device at "
    ) and s["reason"].endswith("UTC (gate max_error_rate)")
    latest = {g["gate"]: g for g in s["gates"]}
    g = latest["max_error_rate"]
    assert (g["status"], g["observed"], g["threshold"], g["sample"], g["min_sample"]) == (
        "fail",
        0.31068,
        0.05,
        412,
        100,
    )
    assert g["stage_name"] == "canary" and g["ts"]
    rows = [h for h in s["gate_history"] if h["gate"] == "max_error_rate"]
    assert [r["status"] for r in rows] == ["wait", "fail"]
    assert rows[-1]["verdict"] == "fail" and rows[-1]["figures"]["errors"] == 128
    assert s["stages"][0]["gate_results"]
    with Session(fleet.client.app.state.ctx.engine) as session:
        stored = session.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == rid)).all()
    assert {r.gate for r in stored} >= {"max_error_rate", "max_local_rollbacks", "max_silent_devices"}


def test_approval_flow(fleet: Fleet) -> None:
    two_rings(fleet)
    rid = fleet.rollout(fleet.bundle(1), [{**CANARY, "approval": True}, ALL], gates=ERRORS)
    r = fleet.op(rid, "approve")
    assert r.status_code == 409 and "not waiting for approval yet" in r.json()["detail"]
    fleet.health("c1", 1, at=10, inferences=200, errors=1)
    fleet.tick(61)
    s = fleet.status(rid)
    assert s["awaiting_approval"] and s["stages"][0]["state"] == "awaiting_approval"
    assert s["state"] == "running" and s["last_evaluation"].endswith("waiting for approval")
    fleet.tick(120)
    assert fleet.status(rid)["current_stage"] == 0  # waits as long as it takes
    assert fleet.desired("m1") == {}
    r = fleet.op(rid, "approve")
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["current_stage"] == 1 and [st["state"] for st in s["stages"]] == ["passed", "active"]
    kinds = [e["kind"] for e in s["events"]]
    assert kinds.index("awaiting_approval") < kinds.index("approved") < kinds.index("stage_passed")
    assert fleet.desired("m1") == {MODEL: 1}
    r = fleet.op(rid, "approve")  # the stage "all" does not ask for approval
    assert r.status_code == 409 and "does not ask for approval" in r.json()["detail"]
    assert fleet.op(rid, "pause").status_code == 200
    assert fleet.op(rid, "approve").status_code == 409  # only a running rollout


def test_approval_wait_stores_gate_evaluations_when_it_begins_then_periodically(fleet: Fleet) -> None:
    two_rings(fleet)
    rid = fleet.rollout(fleet.bundle(1), [{**CANARY, "approval": True}, ALL], gates=ERRORS)
    fleet.health("c1", 1, at=10, inferences=200, errors=1)
    fleet.tick(61)
    assert fleet.status(rid)["awaiting_approval"]
    begun = len(fleet.status(rid)["gate_history"])
    for t in range(62, 62 + 20):  # a tick a second, as the controller runs: nothing new to store
        fleet.tick(t)
    history = fleet.status(rid)["gate_history"]
    assert len(history) == begun, [(g["gate"], g["verdict"], g["ts"]) for g in history]
    gates = len(fleet.status(rid)["gates"])
    assert gates and {g["verdict"] for g in history[-gates:]} == {"await_approval"}
    fleet.tick(61 + 31)  # past GATE_RECORD_INTERVAL_S: each gate once more, still awaiting
    assert len(fleet.status(rid)["gate_history"]) == begun + gates


def test_failed_gate_during_approval_wait_rolls_back(fleet: Fleet) -> None:
    two_rings(fleet)
    old = fleet.bundle(1)
    first = fleet.rollout(old, [ALL], gates={})
    for d in ("c1", "m1", "m2"):
        fleet.health(d, 1, at=1)
    fleet.tick(2)
    assert fleet.status(first)["state"] == "succeeded"
    rid = fleet.rollout(fleet.bundle(2), [{**CANARY, "approval": True}, ALL], at=10, gates=ERRORS)
    fleet.health("c1", 2, at=20, inferences=200, errors=2)
    fleet.tick(71)
    assert fleet.status(rid)["awaiting_approval"]
    fleet.health("c1", 2, at=80, inferences=300, errors=90)
    fleet.tick(81)
    s = fleet.status(rid)
    assert s["state"] == "rolled_back" and not s["awaiting_approval"]
    assert "error_rate 0.18 > 0.05 over 500 inferences" in s["reason"]
    assert fleet.desired("c1") == {MODEL: 3}  # r1 re-issued as r3
    assert fleet.desired("m1") == {MODEL: 1}


def test_silent_device_counts_against_its_stage(fleet: Fleet) -> None:
    fleet.enroll("a", "b", "c", ring="main")
    rid = fleet.rollout(fleet.bundle(1), [ALL], gates={}, silent_after_s=120, on_gate_failure="pause")
    fleet.health("a", 1, at=10)
    fleet.health("b", 1, at=100)
    fleet.tick(110)
    s = fleet.status(rid)
    assert (
        s["state"] == "running" and "2 of 3 devices report r1 committed (1 assigned)" in s["last_evaluation"]
    )
    fleet.tick(125)
    s = fleet.status(rid)
    assert s["state"] == "paused"
    # c never reported since it was told to update; a reported at 10 s, so it has until 130 s
    assert "stage all: silent_devices 1 > 0: c silent at " in s["reason"]
    assert devices_of(s)["c"]["progress"] == "silent" and devices_of(s)["c"]["reason"] == "silent"
    assert "never heard from since assigned" in devices_of(s)["c"]["detail"]
    assert devices_of(s)["b"]["progress"] == "committed"


def test_local_rollback_is_reflected_at_once_with_its_reason(fleet: Fleet) -> None:
    two_rings(fleet)
    first = fleet.rollout(fleet.bundle(1), [ALL], gates={})
    for d in ("c1", "m1", "m2"):
        fleet.health(d, 1, at=1)
    fleet.tick(2)
    rid = fleet.rollout(fleet.bundle(2), [CANARY, ALL], at=10, gates=ERRORS)
    assert fleet.status(first)["state"] == "succeeded"
    fleet.event("c1", "activated", 2, at=11, from_release=1)
    fleet.event("c1", "rolled_back", 1, at=14, from_release=2, reason="trial_errors", message="0.6 > 0.5")
    fleet.tick(15)
    s = fleet.status(rid)
    assert s["state"] == "rolled_back"
    assert "stage canary: local_rollbacks 1 > 0: c1 trial_errors at " in s["reason"]
    c1 = devices_of(s)["c1"]
    assert (c1["progress"], c1["reason"]) == ("rolled_back", "trial_errors")


def test_offline_fraction_stops_the_rollout(fleet: Fleet) -> None:
    fleet.enroll("a", "b", "c", ring="main")
    rid = fleet.rollout(fleet.bundle(1), [ALL], gates={"max_offline_fraction": 0.5}, on_gate_failure="pause")
    fleet.health("a", 1, at=5)
    fleet.offline("b", at=6)
    fleet.tick(7)
    assert fleet.status(rid)["state"] == "running"  # 1 of 3
    fleet.offline("c", at=8)
    fleet.tick(9)
    s = fleet.status(rid)
    assert s["state"] == "paused"
    assert "offline_fraction 0.67 > 0.5: 2 of 3 devices offline or silent (b, c)" in s["reason"]
    assert devices_of(s)["b"]["online"] is False


@pytest.mark.parametrize("action", ["pause", "extend", "fail"])
def test_inconclusive_stage(fleet: Fleet, action: str) -> None:
    two_rings(fleet)
    rid = fleet.rollout(
        fleet.bundle(1),
        [CANARY, ALL],
        gates={"max_error_rate": 0.05, "min_inferences": 500},
        on_inconclusive=action,
        extend_seconds=30,
        max_extensions=1,
        on_gate_failure="pause",
    )
    fleet.health("c1", 1, at=10, inferences=120)
    fleet.tick(59)
    assert fleet.status(rid)["state"] == "running"
    fleet.tick(61)
    s = fleet.status(rid)
    short = "inconclusive: gate max_error_rate has 120 of 500 inferences"
    if action == "pause":
        assert s["state"] == "paused" and s["reason"] == f"stage canary: {short}"
        assert [e["kind"] for e in s["events"]][-2:] == ["inconclusive", "paused"]
        return
    if action == "fail":
        assert s["state"] == "paused"  # on_gate_failure=pause
        assert s["reason"].startswith(f"stage canary: {short} after 61 s at ")
        return
    assert s["state"] == "running" and s["extensions"] == 1
    assert "bake time extended by 30 s (1 of 1)" in s["last_evaluation"]
    fleet.tick(80)
    assert "bake 80 s of 90 s (extended 1x by 30 s)" in fleet.status(rid)["last_evaluation"]
    fleet.tick(91)
    s = fleet.status(rid)
    assert s["state"] == "paused" and s["reason"] == f"stage canary: {short} after 1 extensions"
    # resume restarts the stage with its extensions; enough data then passes it
    assert fleet.op(rid, "resume").json()["extensions"] == 0


def test_latency_gate_compares_with_the_previous_release(fleet: Fleet) -> None:
    two_rings(fleet)
    first = fleet.rollout(fleet.bundle(1), [ALL], gates={})
    for d in ("c1", "m1", "m2"):
        fleet.health(d, 1, at=1)
    fleet.tick(2)
    assert fleet.status(first)["state"] == "succeeded"
    # r1 windows before the canary was told to update: the baseline
    fleet.health("c1", 1, at=50, inferences=100, p95_ms=10.0)
    fleet.health("c1", 1, at=55, inferences=100, p95_ms=12.0)
    rid = fleet.rollout(
        fleet.bundle(2), [CANARY, ALL], at=60, gates={"max_latency_ratio": 1.5, "min_inferences": 100}
    )
    fleet.health("c1", 2, at=70, inferences=150, p95_ms=30.0)
    fleet.tick(71)
    s = fleet.status(rid)
    assert s["state"] == "rolled_back", s["last_evaluation"]
    assert "latency p95 ratio 2.73 > 1.5 (p95 30.0 ms vs 11.0 ms on the previous release" in s["reason"]


def test_drift_gate_and_ingested_drift(fleet: Fleet) -> None:
    two_rings(fleet)
    rid = fleet.rollout(fleet.bundle(1), [CANARY, ALL], gates={"max_drift": 0.2})
    fleet.health("c1", 1, at=10, inferences=50, drift=0.5)
    fleet.tick(11)
    s = fleet.status(rid)
    assert s["state"] == "rolled_back" and "drift 0.50 > 0.2 over 1 window on 1 device" in s["reason"]

    # an agent that sends no drift (older agents) decodes to None
    base = {"name": "m", "release": 1, "version": "1", "state": "committed"}
    base |= {"inferences": 1, "errors": 0, "total_inferences": 1, "total_errors": 0}
    assert drift(msgspec.convert({**base, "drift": 0.25}, ModelHealth)) == 0.25
    assert drift(msgspec.convert(base, ModelHealth)) is None


def test_device_enrolled_mid_rollout_joins_its_stage(fleet: Fleet) -> None:
    two_rings(fleet)
    other = fleet.bundle(1)
    rid = fleet.rollout(other, [CANARY, ALL], gates={})
    fleet.enroll("late-canary", ring="canary")
    fleet.enroll("late-main", ring="main")
    fleet.tick(1)
    s = fleet.status(rid)
    assert devices_of(s)["late-canary"]["stage"] == 0 and devices_of(s)["late-main"]["stage"] == 1
    assert fleet.desired("late-canary") == {MODEL: 1}  # its stage is current: assigned now
    assert fleet.desired("late-main") == {}  # its stage is not reached yet
    assert any(e["kind"] == "devices_joined" for e in s["events"])
    for d in ("c1", "late-canary"):
        fleet.health(d, 1, at=5)
    fleet.tick(61)
    assert fleet.status(rid)["current_stage"] == 1
    assert fleet.desired("late-main") == {MODEL: 1}


def test_device_of_another_active_rollout_does_not_join(fleet: Fleet) -> None:
    fleet.enroll("a", ring="main")
    b1 = fleet.bundle(1)
    mine = fleet.rollout(b1, [{"name": "ring-x", "selector": {"ring": "x"}}], gates={})
    theirs = fleet.rollout(b1, [{"name": "ring-main", "selector": {"ring": "main"}}], gates={})
    fleet.enroll("b", ring="main")  # both rollouts' selectors match "lab"; only "theirs" stages match
    fleet.tick(1)
    assert "b" in devices_of(fleet.status(theirs))
    assert devices_of(fleet.status(mine)) == {}
    # starting a third rollout over the same devices is refused: no fight over a device
    r = fleet.client.post(
        "/api/v1/rollouts",
        json={"name": "x", "bundle_id": b1, "selector": {"site": "lab"}, "stages": [ALL]},
        headers=admin(),
    )
    assert r.status_code == 409 and "already in another active rollout" in r.json()["detail"]


def test_controller_survives_a_restart_mid_stage(
    settings: Settings, keyring: Keyring, tmp_path: Path
) -> None:
    with TestClient(create_app(settings)) as client:
        f = Fleet(client, keyring, tmp_path)
        two_rings(f)
        rid = f.rollout(
            f.bundle(1),
            [{**CANARY, "approval": True}, ALL],
            gates={"max_error_rate": 0.05, "min_inferences": 1000},
            on_inconclusive="extend",
            extend_seconds=60,
        )
        f.health("c1", 1, at=10, inferences=600)
        f.tick(61)
        s = f.status(rid)
        assert s["extensions"] == 1 and s["current_stage"] == 0
        t0 = f.t0
    with TestClient(create_app(settings)) as client:  # a new app and controller, same database
        f = Fleet(client, keyring, tmp_path)
        f.t0 = t0
        f.tick(100)
        assert "bake 100 s of 120 s (extended 1x by 60 s)" in f.status(rid)["last_evaluation"]
        f.health("c1", 1, at=105, inferences=600)
        f.tick(121)
        assert f.status(rid)["awaiting_approval"]
    with TestClient(create_app(settings)) as client:
        f = Fleet(client, keyring, tmp_path)
        f.t0 = t0
        f.creds = {d: "" for d in ("c1", "m1", "m2")}
        s = f.op(rid, "approve").json()
        assert s["current_stage"] == 1
        # the stage's health window starts when it does (approval: 121 s); the rate gate waits
        # for every device of a stage of three to report in it (docs/rollouts.md "Gate policy")
        for d in ("c1", "m1", "m2"):
            f.health(d, 1, at=130, inferences=600)
        f.tick(131)
        s = f.status(rid)
        assert s["state"] == "succeeded", s["last_evaluation"]
        assert [e["kind"] for e in s["events"]].count("stage_started") == 2
        assert {d["progress"] for d in s["devices"]} == {"committed"}
