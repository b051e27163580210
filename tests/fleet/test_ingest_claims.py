"""A device's telemetry as claims, end to end on SQLite and PostgreSQL: the real app over HTTP,
the ingester's real validation and batch path on the app's database.

- negative, NaN and replayed reports change no stored figure, and are counted on the device
  (device detail, Prometheus);
- boundary values of every numeric and text field are stored on both databases; a message
  that fails the database (past the bounds) is refused alone, never with its batch;
- a device over its budget is dropped, counted and flagged, the others are not.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from fleet_support import admin, enroll
from litestar.testing import TestClient
from sqlmodel import Session, func, select

from fleet.broker.client import parse_mqtt_url
from fleet.db.models import HealthReport, HealthRollup
from fleet.ingest.budget import Budget
from fleet.ingest.claims import INT64_MAX, MAX_RELEASE
from fleet.ingest.ingester import Ingester, Item
from shared.telemetry import messages, topics


def health(device: str, seq: int, *, inferences: int = 100, errors: int = 1, name: str = "detector",
           release: int = 1, session: str = "s1", **model: Any) -> messages.Health:
    figures = {"latency_p50_ms": 1.0, "latency_p95_ms": 3.0, **model}
    m = messages.ModelHealth(name=name, release=release, version="1.0.0", state="committed",
                             inferences=inferences, errors=errors, total_inferences=max(inferences, 0),
                             total_errors=max(errors, 0), **figures)
    return messages.Health(v=1, device_id=device, seq=seq, ts=time.time(), interval_s=10.0, models=[m],
                           cpu_percent=5.0, mem_rss_mb=40.0, mem_percent=2.0, disk_free_mb=500.0,
                           session=session)


def send(ing: Ingester, msg: messages.Health | messages.Event, encoding: messages.Encoding = "json",
         payload: bytes | None = None) -> bool:
    kind = "health" if isinstance(msg, messages.Health) else "event"
    return ing.handle(topics.topic(msg.device_id, kind), payload or messages.encode(msg, encoding))


def write_queued(ing: Ingester) -> int:
    items = []
    while not ing.queue.empty():
        items.append(ing.queue.get_nowait())
    return ing.write_isolating(items) + ing.write_isolating([])  # the second: tallied refusals


def stored(client: TestClient[Any], device: str) -> tuple[int, int, int]:
    """(health rows, rollup inferences, rollup errors) of a device."""
    with Session(client.app.state.ctx.engine) as s:
        count = select(func.count()).select_from(HealthReport)
        rows = s.exec(count.where(HealthReport.device_id == device)).one()
        inf, err = s.exec(select(func.coalesce(func.sum(HealthRollup.inferences), 0),
                                 func.coalesce(func.sum(HealthRollup.errors), 0))
                          .where(HealthRollup.device_id == device)).one()
    return int(rows), int(inf), int(err)


def refused(client: TestClient[Any], device: str) -> dict[str, Any]:
    r = client.get(f"/api/v1/devices/{device}", headers=admin())
    assert r.status_code == 200, r.text
    return r.json()["telemetry_refused"]  # type: ignore[no-any-return]


def ingester(client: TestClient[Any], budget: Budget | None = None) -> Ingester:
    return Ingester(client.app.state.ctx.engine, parse_mqtt_url("mqtt://127.0.0.1:1"), budget=budget)


def test_negative_nan_and_replayed_reports_change_no_stored_figure(client: TestClient[Any]) -> None:
    enroll(client, "d1")
    ing = ingester(client)
    good = health("d1", 1, inferences=100, errors=1)
    assert send(ing, good)
    write_queued(ing)
    before = stored(client, "d1")
    assert before == (1, 100, 1)

    # the figures: negative counts, errors past inferences (error rate -4109 ...)
    assert not send(ing, health("d1", 2, inferences=-1, errors=4109))
    assert not send(ing, health("d1", 3, inferences=1, errors=-4109))
    assert not send(ing, health("d1", 4, inferences=10, errors=4119))
    # NaN: MessagePack carries it (JSON cannot), by the fast path and the strict one
    nan = messages.encode(health("d1", 5, latency_p95_ms=float("nan")), "msgpack")
    assert not send(ing, good, payload=nan)
    # more inferences than 10 000/s x 10 s
    assert not send(ing, health("d1", 6, inferences=100_001, errors=0))
    # replayed: the stored report five times (it passes validation; the writer drops it)
    for _ in range(5):
        assert send(ing, good)
    write_queued(ing)

    assert stored(client, "d1") == before
    counts = refused(client, "d1")
    assert [counts[c] for c in ("malformed", "duplicate", "over_budget", "db_refused")] == [5, 5, 0, 0]
    assert "seen before" in counts["last_reason"]
    # NaN in MessagePack: refused by the decoder already (malformed), the others by their bounds
    assert (ing.stats.rejected["bounds"], ing.stats.rejected["malformed"]) == (4, 1)
    assert ing.stats.rejected["duplicate"] == 5
    assert (counts["session"], counts["seq_high"]) == ("s1", 1)

    metrics = client.get("/metrics").text
    assert 'edgefleet_device_telemetry_refused{cause="duplicate",device="d1"} 5.0' in metrics
    assert 'edgefleet_device_telemetry_refused{cause="malformed",device="d1"} 5.0' in metrics
    assert 'edgefleet_ingest_rejected_total{reason="bounds"}' in metrics


def test_the_spool_s_redelivery_after_a_reconnect_is_stored_once(client: TestClient[Any]) -> None:
    """The agent resends its unacknowledged window after a reconnect: seqs 3..5 twice, interleaved
    with new ones, an event among them; each stored once."""
    enroll(client, "d1")
    ing = ingester(client)
    event = messages.Event(v=1, device_id="d1", seq=4, ts=time.time(), model="detector", kind="committed",
                           release=1, session="s1")
    for seq in (1, 2, 3):
        send(ing, health("d1", seq))
    send(ing, event)
    write_queued(ing)
    for msg in (health("d1", 3), event, health("d1", 5), health("d1", 3), health("d1", 6), event):
        send(ing, msg, "msgpack")
    write_queued(ing)
    assert stored(client, "d1") == (5, 500, 5)
    assert refused(client, "d1")["duplicate"] == 4


def test_boundary_values_are_stored_and_a_poisoned_message_is_refused_alone(client: TestClient[Any]) -> None:
    devices = [f"d{i}" for i in range(6)]
    for d in devices:
        enroll(client, d)
    ing = ingester(client)
    # at every bound: through the real validation, stored on this database
    edge = health("d0", INT64_MAX, inferences=100_000, errors=100_000, name="m" * 64, release=MAX_RELEASE,
                  session="s" * 32, drift=1000.0, held=[MAX_RELEASE] * 16, waiting="w" * 256,
                  last_event=messages.LastEvent(seq=INT64_MAX, ts=time.time(), kind="committed",
                                                release=MAX_RELEASE, from_release=MAX_RELEASE))
    edge.models[0].total_inferences = edge.models[0].total_errors = INT64_MAX
    edge.models[0].version = edge.models[0].state = "v" * 256
    edge.models[0].latency_p50_ms = edge.models[0].latency_p95_ms = 600_000.0
    edge.models[0].drift_inputs = {f"i{n}": 1000.0 for n in range(256)}
    edge.cpu_percent, edge.mem_rss_mb, edge.disk_free_mb, edge.uptime_s = 102_400.0, 1e9, 1e12, 1e11
    edge.dropped = edge.dropped_health = edge.dropped_events = edge.spooled = INT64_MAX
    edge.temperature_c, edge.mem_percent, edge.device_cpu_percent = -273.15, 100.0, 100.0
    status = messages.Status(v=1, device_id="d0", online=True, ts=time.time(), agent_version="a" * 256,
                             seq=INT64_MAX - 2, session="s" * 32)
    assert ing.handle(topics.topic("d0", "status"), messages.encode(status))
    edge_event = messages.Event(v=1, device_id="d0", seq=INT64_MAX - 1, ts=time.time(), model="m" * 64,
                                kind="committed", release=MAX_RELEASE, from_release=MAX_RELEASE,
                                message="x" * 2000, session="s" * 32)
    assert send(ing, edge) and send(ing, edge_event, "msgpack")
    items = [ing.queue.get_nowait() for _ in range(3)]
    # poison, past the validation (as a bug in it would let through): numbers no BIGINT holds, a
    # name longer than its column, one per device, amid the good reports of every device
    now = datetime.now(UTC)
    poison = [health("d1", 2**63), health("d2", 7, release=2**64), health("d3", 7, inferences=2**63 + 1),
              health("d4", 7, name="n" * 65 if _postgres(client) else "n", release=-(2**63) - 1)]
    for seq in (1, 2):
        items += [Item(d, "health", health(d, seq), now) for d in devices[1:]]
    items[len(items) // 2:len(items) // 2] = [Item(p.device_id, "health", p, now) for p in poison]
    written = ing.write_isolating(items)
    ing.write_isolating([])

    assert written == 3 + 2 * 5
    for d in devices[1:]:
        assert stored(client, d) == (2, 200, 2), d
    with Session(client.app.state.ctx.engine) as s:
        row = s.exec(select(HealthReport).where(HealthReport.device_id == "d0")).one()
    assert (row.seq, row.release, row.model, row.inferences) == (INT64_MAX, MAX_RELEASE, "m" * 64, 100_000)
    assert (row.p95_ms, row.cpu_percent, row.rss_mb, row.drift) == (600_000.0, 102_400.0, 1e9, 1000.0)
    for p in poison:
        counts = refused(client, p.device_id)
        assert counts["db_refused"] == 1, (p.device_id, counts)
        assert counts["last_reason"].startswith(f"health seq {p.seq}: ")
    assert ing.stats.rejected["db_refused"] == len(poison)
    detail = client.get("/api/v1/devices/d0", headers=admin()).json()
    assert detail["models"]["m" * 64]["release"] == MAX_RELEASE
    assert detail["agent_version"] == "a" * 256
    assert detail["models"]["m" * 64]["held"] == [MAX_RELEASE] * 16


def test_a_device_over_its_budget_is_dropped_counted_and_flagged(client: TestClient[Any]) -> None:
    enroll(client, "noisy")
    enroll(client, "calm")
    ing = ingester(client, Budget(messages_per_min=60, messages_burst=10, bytes_per_min=60_000,
                                  bytes_burst=100_000, rows_per_min=600, rows_burst=1000))
    accepted = sum(send(ing, health("noisy", seq)) for seq in range(1, 1001))  # 100x its burst
    calm = sum(send(ing, health("calm", seq)) for seq in range(1, 6))
    write_queued(ing)
    assert 10 <= accepted <= 12  # the burst, and what refilled meanwhile (1/s)
    assert calm == 5 and stored(client, "calm") == (5, 500, 5)
    assert stored(client, "noisy")[0] == accepted
    counts = refused(client, "noisy")
    assert counts["over_budget"] == 1000 - accepted
    assert counts["over_budget_at"] is not None and "messages budget" in counts["last_reason"]
    assert refused(client, "calm")["over_budget"] == 0


def _postgres(client: TestClient[Any]) -> bool:
    return bool(client.app.state.ctx.engine.dialect.name == "postgresql")


def test_messages_of_unknown_devices_are_not_counted_on_any_row(client: TestClient[Any]) -> None:
    ing = ingester(client)
    assert not send(ing, health("ghost", 1, inferences=-1))
    assert send(ing, health("ghost", 2))
    write_queued(ing)
    assert ing.stats.rejected["unknown_device"] == 1
    r = client.get("/api/v1/devices/ghost", headers=admin())
    assert r.status_code == 404
    assert msgspec.json.decode(r.content)  # a JSON error, not a 500


def test_a_revoked_device_reports_nothing_even_where_the_broker_lets_it_publish(
    client: TestClient[Any],
) -> None:
    """The embedded broker is anonymous: a revoked device can still publish there, and the
    ingester refuses its reports as it does an unknown device's."""
    enroll(client, "gone")
    ing = ingester(client)
    assert send(ing, health("gone", 1))
    write_queued(ing)
    assert stored(client, "gone")[0] == 1
    assert client.post("/api/v1/devices/gone/revoke", headers=admin()).status_code == 200
    assert send(ing, health("gone", 2))
    write_queued(ing)
    assert stored(client, "gone")[0] == 1
    assert ing.stats.rejected["unknown_device"] == 1


def test_budgets_and_bounds_come_from_the_settings(settings: Any, monkeypatch: Any) -> None:
    import dataclasses

    from fleet.app import create_app
    from fleet.settings import Settings

    monkeypatch.setenv("EDGEFLEET_INGEST_MESSAGES_PER_MIN", "5")
    monkeypatch.setenv("EDGEFLEET_INGEST_MAX_INFERENCES_PER_S", "50")
    from_env = Settings.from_env()
    assert (from_env.ingest_messages_per_min, from_env.ingest_max_inferences_per_s) == (5.0, 50.0)
    app = create_app(dataclasses.replace(settings, run_ingester=True, ingest_messages_per_min=5.0,
                                         ingest_bytes_per_min=0.0, ingest_max_inferences_per_s=50.0))
    ing = app.state.ctx.ingester
    assert (ing.budgets.budget.messages_per_min, ing.budgets.budget.bytes_per_min) == (5.0, 0.0)
    assert ing.bounds.max_inferences_per_s == 50.0
    app.state.ctx.engine.dispose()


def test_deleting_a_device_forgets_its_claims(client: TestClient[Any]) -> None:
    enroll(client, "d1")
    ing = ingester(client)
    assert send(ing, health("d1", 5)) and not send(ing, health("d1", 6, inferences=-1))
    write_queued(ing)
    assert (refused(client, "d1")["malformed"], refused(client, "d1")["seq_high"]) == (1, 5)
    assert client.delete("/api/v1/devices/d1", headers=admin()).status_code == 200
    enroll(client, "d1")  # enrolled anew: a new device under the old id
    counts = refused(client, "d1")
    assert (counts["malformed"], counts["seq_high"], counts["session"]) == (0, None, None)


def test_statuses_fill_the_window_so_an_in_order_device_has_an_empty_bitmap(client: TestClient[Any]) -> None:
    from fleet.db.models import DeviceClaim

    enroll(client, "d1")
    ing = ingester(client)

    def status(seq: int, online: bool = True) -> None:
        msg = messages.Status(v=1, device_id="d1", online=online, ts=time.time(), seq=seq, session="s1")
        assert ing.handle(topics.topic("d1", "status"), messages.encode(msg))

    status(0)  # a new agent's session numbers from 0
    send(ing, health("d1", 1))
    send(ing, health("d1", 2))
    status(3, online=False)
    status(3, online=False)  # retained, sent again on a subscribe: applied, not a duplicate
    status(4)
    send(ing, health("d1", 5))
    send(ing, health("d1", 6))
    write_queued(ing)
    with Session(client.app.state.ctx.engine) as s:
        claim = s.get(DeviceClaim, "d1")
        assert (claim.seq_high, claim.seq_missing, claim.duplicate) == (6, b"", 0)
    assert stored(client, "d1")[0] == 4
