"""Events recovered from health (``ModelHealth.last_event``), on SQLite and PostgreSQL: an
event that reached the broker but not the fleet (Mosquitto drops shared subscriptions when it
restarts) is stored from the next health message exactly once, moves the serving state, and
the rollout's ``local_rollbacks`` gate counts it. The ingester's real write path
(``handle`` + ``write_batch``), without a broker connection."""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fleet_support import admin, enroll, make_bundle, upload
from litestar.testing import TestClient
from sqlmodel import Session, col, select

from fleet.broker.client import parse_mqtt_url
from fleet.db.engine import make_engine
from fleet.db.models import Device, DeviceEvent
from fleet.ingest.ingester import Ingester
from fleet.rollout.controller import RolloutController
from shared.telemetry import messages, topics

from ..waiting import wait_for

MODEL = "detector"
T0 = time.time() - 600  # the device's clock: events a few minutes ago
ROLLED_BACK = messages.LastEvent(seq=383, ts=T0 + 383, kind="rolled_back", release=1, from_release=2,
                                 reason="trial_errors")


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    engine = make_engine(db_url)
    with Session(engine) as s:
        s.add(Device(id="dev-1", labels={"site": "lab"}, credential_hash="x" * 64))
        s.commit()
    yield engine
    engine.dispose()


@pytest.fixture
def ingester(engine: Any) -> Ingester:
    return Ingester(engine, parse_mqtt_url("mqtt://127.0.0.1:1"))


def health(seq: int, last_event: messages.LastEvent | None, *, release: int = 1,
           state: str = "rolled_back", device: str = "dev-1") -> messages.Health:
    model = messages.ModelHealth(name=MODEL, release=release, version=f"1.0.{release}", state=state,
                                 inferences=10, errors=0, total_inferences=10, total_errors=0,
                                 last_event=last_event)
    return messages.Health(v=1, device_id=device, seq=seq, ts=T0 + seq, interval_s=10.0, models=[model],
                           cpu_percent=1.0, mem_rss_mb=10.0, mem_percent=1.0, disk_free_mb=100.0)


def event(seq: int, kind: str = "rolled_back", release: int = 1, from_release: int | None = 2,
          reason: str | None = "trial_errors", ts: float | None = None,
          message: str = "error rate 0.4 in trial") -> messages.Event:
    return messages.Event(v=1, device_id="dev-1", seq=seq, ts=T0 + seq if ts is None else ts, model=MODEL,
                          kind=kind, release=release, from_release=from_release, reason=reason,
                          message=message)


def feed(ing: Ingester, *msgs: messages.Health | messages.Event, encoding: messages.Encoding = "msgpack",
         one_batch: bool = False) -> None:
    """Each message through ``handle`` (decode, validate), then written: each in its own batch,
    or all in one (the batch merges state in message order)."""
    batches: list[list[Any]] = []
    for msg in msgs:
        kind = "health" if isinstance(msg, messages.Health) else "event"
        assert ing.handle(topics.topic(msg.device_id, kind), messages.encode(msg, encoding))
        batches.append([ing.queue.get_nowait()])
    if one_batch:
        batches = [[i for b in batches for i in b]]
    for items in batches:
        duplicates = ing.stats.rejected["duplicate"]
        written = ing.write_batch(items)
        # a redelivered message (a seq already stored) is dropped and counted as a duplicate
        assert written + ing.stats.rejected["duplicate"] - duplicates == len(items)


def rows(engine: Any) -> list[DeviceEvent]:
    with Session(engine) as s:
        return list(s.exec(select(DeviceEvent).order_by(col(DeviceEvent.seq), col(DeviceEvent.id))).all())


def model_entry(engine: Any) -> dict[str, Any]:
    with Session(engine) as s:
        device = s.get(Device, "dev-1")
        assert device is not None
        return dict(device.models[MODEL])


@pytest.mark.parametrize("one_batch", [False, True])
@pytest.mark.parametrize("encoding", messages.ENCODINGS)
def test_a_missed_rolled_back_is_recovered_once_from_health(
    ingester: Ingester, engine: Any, encoding: messages.Encoding, one_batch: bool
) -> None:
    # The fleet saw the activation of r2, then lost the rolled_back (seq 383).
    feed(ingester, event(370, "activated", release=2, from_release=1, reason=None),
         health(371, None, release=2, state="trial"),
         # (a) the health after the loss carries it: one row, the serving state moves
         health(390, ROLLED_BACK),
         health(391, ROLLED_BACK),  # every later health repeats it: nothing more
         # (b) the lost event itself, late (e.g. a redelivery): no second row
         event(383), encoding=encoding, one_batch=one_batch)
    got = [(r.seq, r.kind, r.release, r.from_release, r.reason, r.message) for r in rows(engine)]
    assert got == [
        (370, "activated", 2, 1, None, "error rate 0.4 in trial"),
        (383, "rolled_back", 1, 2, "trial_errors", "recovered from health seq 390"),
    ]
    recovered = rows(engine)[1]
    assert recovered.ts == pytest.approx(ROLLED_BACK.ts) and recovered.device_id == "dev-1"
    entry = model_entry(engine)
    assert (entry["release"], entry["state"], entry["event_seq"]) == (1, "rolled_back", 383)
    assert entry["event_ts"] == pytest.approx(ROLLED_BACK.ts)


@pytest.mark.parametrize("one_batch", [False, True])
def test_an_event_then_a_health_repeating_it_adds_no_row(
    ingester: Ingester, engine: Any, one_batch: bool
) -> None:
    # (c) nothing was lost: the health's last_event is the event already stored
    feed(ingester, event(383), health(390, ROLLED_BACK), health(400, ROLLED_BACK), one_batch=one_batch)
    ((seq, message),) = [(r.seq, r.message) for r in rows(engine)]
    assert (seq, message) == (383, "error rate 0.4 in trial")  # the event's own row, with its text
    entry = model_entry(engine)
    assert (entry["release"], entry["state"], entry["event_seq"]) == (1, "rolled_back", 383)


def test_an_older_event_arriving_late_is_stored_but_does_not_move_the_state_back(
    ingester: Ingester, engine: Any
) -> None:
    feed(ingester, health(390, ROLLED_BACK))
    # seq 380 (activated r2) was lost too and now arrives: history, not the current state
    feed(ingester, event(380, "activated", release=2, from_release=1, reason=None))
    assert [(r.seq, r.kind) for r in rows(engine)] == [(380, "activated"), (383, "rolled_back")]
    entry = model_entry(engine)
    assert (entry["release"], entry["state"], entry["event_seq"]) == (1, "rolled_back", 383)
    # a plain redelivery of the latest event: no row either
    feed(ingester, event(383))
    assert len(rows(engine)) == 2


def test_a_device_whose_seq_started_over_is_believed_by_its_later_ts(
    ingester: Ingester, engine: Any
) -> None:
    """A wiped state directory restarts the agent's seq at 0: a lower seq with a later ts is new."""
    feed(ingester, health(390, ROLLED_BACK))
    later = ROLLED_BACK.ts + 60
    feed(ingester, event(4, "activated", release=3, from_release=1, reason=None, ts=later))
    entry = model_entry(engine)
    assert (entry["release"], entry["state"], entry["event_seq"]) == (3, "activated", 4)
    # and its later health recovers a missed commit the same way
    committed = messages.LastEvent(seq=6, ts=later + 5, kind="committed", release=3, from_release=1)
    feed(ingester, health(7, committed, release=3, state="committed"))
    got = [(r.seq, r.kind) for r in rows(engine)]
    assert got == [(4, "activated"), (6, "committed"), (383, "rolled_back")]
    assert model_entry(engine)["event_seq"] == 6


def test_health_without_last_event_keeps_the_recorded_event(ingester: Ingester, engine: Any) -> None:
    """An older agent (or one just restarted) sends no last_event: nothing is recovered, and the
    recorded seq survives the health message's replacement of the model entry."""
    feed(ingester, event(383), health(390, None), health(391, None))
    assert len(rows(engine)) == 1
    entry = model_entry(engine)
    assert (entry["event_seq"], entry["state"]) == (383, "rolled_back")
    feed(ingester, event(383))
    assert len(rows(engine)) == 1
    assert ingester.stats.rejected["duplicate"] == 1


# -- (d) the rollout's local_rollbacks gate counts a recovered rollback ----------------------

def test_the_local_rollbacks_gate_counts_a_recovered_rollback(
    client: TestClient[Any], keyring: Any, tmp_path: Path
) -> None:
    for d in ("d1", "d2"):
        enroll(client, d, site="lab")
    upload(client, make_bundle(tmp_path / "r1", keyring, release=1).path)
    r2 = upload(client, make_bundle(tmp_path / "r2", keyring, release=2).path).json()
    body = {"name": "r2", "bundle_id": r2["id"], "selector": {"site": "lab"},
            "stages": [{"name": "all", "percent": 100, "bake_seconds": 3600}],
            "gates": {"max_local_rollbacks": 0, "min_inferences": 1000}, "on_gate_failure": "rollback"}
    r = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    rid = int(r.json()["id"])
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=admin()).status_code == 200
    ctrl: RolloutController = client.app.state.ctx.controller
    ing = Ingester(client.app.state.ctx.engine, parse_mqtt_url("mqtt://127.0.0.1:1"))

    def send(msg: messages.Health | messages.Event) -> None:
        kind = "health" if isinstance(msg, messages.Health) else "event"
        assert ing.handle(topics.topic(msg.device_id, kind), messages.encode(msg))
        assert ing.write_batch([ing.queue.get_nowait()]) == 1

    now = time.time()
    trial = messages.LastEvent(seq=10, ts=now, kind="activated", release=2, from_release=1)
    send(health(11, trial, release=2, state="trial", device="d1"))
    send(health(11, trial, release=2, state="trial", device="d2"))
    decision = ctrl.tick()[rid]
    assert decision.verdict.value == "wait", decision.message
    # d1's rolled_back (seq 12) never reached the fleet; its next health carries it
    back = messages.LastEvent(seq=12, ts=now + 1, kind="rolled_back", release=1, from_release=2,
                              reason="trial_errors")
    send(health(13, back, release=1, state="rolled_back", device="d1"))
    decision = ctrl.tick()[rid]
    assert decision.verdict.value == "fail", decision.message
    s = client.get(f"/api/v1/rollouts/{rid}", headers=admin()).json()
    assert s["state"] == "rolled_back", s
    assert "max_local_rollbacks" in s["reason"], s["reason"]
    d1 = next(m for m in s["devices"] if m["device_id"] == "d1")
    assert "trial_errors" in str(d1), d1
    with Session(client.app.state.ctx.engine) as session:
        (row,) = session.exec(select(DeviceEvent).where(DeviceEvent.kind == "rolled_back")).all()
        assert (row.device_id, row.seq, row.message) == ("d1", 12, "recovered from health seq 13")


# -- end to end: a real Mosquitto restart loses a shared subscription's event ----------------

def test_an_event_lost_in_a_broker_restart_is_recovered_from_the_next_health(
    mosquitto: Any, tmp_path: Path
) -> None:
    """Mosquitto (persistence on) keeps a persistent session over its restart, but not the
    session's shared subscriptions: an event published before the ingester subscribes again
    reaches no one. The next health message brings it back."""
    mosquitto.stop()
    (tmp_path / "broker-db").mkdir()
    mosquitto.conf.write_text(mosquitto.conf.read_text().replace("persistence false\n", "") +
                              f"persistence true\npersistence_location {tmp_path / 'broker-db'}/\n"
                              f"user {getpass.getuser()}\n")
    mosquitto.start()
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    with Session(engine) as s:
        s.add(Device(id="dev-1", labels={}, credential_hash="x" * 64))
        s.commit()
    ing = Ingester(engine, parse_mqtt_url(mosquitto.url), flush_interval_s=0.05,
                   shared_group="edgefleet-ingest", session_expiry_s=3600)
    ing.start(wait=10)

    def publish(msg: messages.Health | messages.Event) -> None:
        kind = "health" if isinstance(msg, messages.Health) else "event"
        pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
        pub.connect(mosquitto.host, mosquitto.port)
        pub.loop_start()
        try:
            pub.publish(topics.topic("dev-1", kind), messages.encode(msg), qos=1).wait_for_publish(5)
        finally:
            pub.disconnect()
            pub.loop_stop()

    def stored() -> list[tuple[int, str, str]]:
        return [(r.seq, r.kind, r.message) for r in rows(engine)]

    try:
        assert ing.connected.wait(10) and ing.shared
        publish(event(370, "activated", release=2, from_release=1, reason=None))
        wait_for(lambda: len(stored()) == 1)
        # The broker restarts; the ingester has not subscribed again when the rollback comes.
        ing.client.loop_stop()
        ing.connected.clear()  # what its on_disconnect does; its loop is not there to run it
        mosquitto.stop()
        mosquitto.start()
        publish(event(383))
        ing.client.loop_start()  # now it reconnects (its session resumed) and subscribes again
        wait_for(lambda: ing.connected.is_set(), timeout=15, what="the ingester's SUBACK")
        publish(health(384, None, release=2, state="trial"))  # an older agent's health: nothing
        wait_for(lambda: ing.stats.snapshot()["written"] >= 2)
        time.sleep(0.3)
        assert stored() == [(370, "activated", "error rate 0.4 in trial")]  # 383 is lost
        publish(health(390, ROLLED_BACK))
        wait_for(lambda: len(stored()) == 2)
        time.sleep(0.3)  # a duplicate would be written in the next flush
        assert stored() == [(370, "activated", "error rate 0.4 in trial"),
                            (383, "rolled_back", "recovered from health seq 390")]
        entry = model_entry(engine)
        assert (entry["release"], entry["state"], entry["event_seq"]) == (1, "rolled_back", 383)
    finally:
        ing.stop()
        engine.dispose()
