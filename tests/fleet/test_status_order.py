"""The ingester applies birth and death newest-first (Status.bd_seq, messages.status_supersedes)
on a real Mosquitto and SQLite: a death delivered before the birth it closes, a stale death
of an older connection, and a late health after a death never leave a dead device online;
an agent without birth/death numbers is applied in arrival order, as before."""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import Session

from fleet.db.models import Device
from fleet.ingest.ingester import Ingester
from shared.telemetry import messages, topics

from ..waiting import wait_for
from . import test_fleet_ingest as ingest_tests
from .test_fleet_ingest import Sender, health

ingester, sqlite_engine = ingest_tests.ingester, ingest_tests.sqlite_engine  # its fixtures


SEQ = iter(range(100, 10_000))


def _status(online: bool, ts: float, bd_seq: int) -> bytes:
    return messages.encode(messages.Status(v=1, device_id="dev-1", online=online, ts=ts, bd_seq=bd_seq,
                                           seq=next(SEQ), session="s1", agent_version="0.1.0"))


def _online_after(ingester: Ingester, engine: Any, sender: Sender, *payloads: tuple[str, bytes]) -> bool:
    before = ingester.stats.snapshot()["written"]
    for kind, payload in payloads:
        sender.send(topics.topic("dev-1", kind), payload)
    wait_for(lambda: ingester.stats.snapshot()["written"] >= before + len(payloads), 10,
             f"the batch; {ingester.stats.snapshot()}")
    with Session(engine) as s:
        device = s.get(Device, "dev-1")
        assert device is not None
        return device.online


def test_birth_and_death_apply_newest_first(ingester: Ingester, mosquitto: Any, sqlite_engine: Any) -> None:
    sender = Sender(mosquitto.url)
    t = time.time()
    will = t + messages.WILL_AFTER_BIRTH_S
    try:
        # the death arrives before the birth it closes: offline
        assert _online_after(ingester, sqlite_engine, sender, ("status", _status(False, will, 1)),
                             ("status", _status(True, t, 1))) is False
        # a late health of that dead connection does not bring it back
        assert _online_after(ingester, sqlite_engine, sender, ("health", health("dev-1", 5))) is False
        # the next connection's birth does; a stale death of the first connection (delivered
        # again, say by another ingester) does not undo it
        assert _online_after(ingester, sqlite_engine, sender, ("status", _status(True, t + 5, 2))) is True
        assert _online_after(ingester, sqlite_engine, sender, ("status", _status(False, will, 1))) is True
        assert _online_after(ingester, sqlite_engine, sender, ("health", health("dev-1", 6))) is True
        # its own death closes it
        assert _online_after(ingester, sqlite_engine, sender,
                             ("status", _status(False, t + 5 + messages.WILL_AFTER_BIRTH_S, 2))) is False
        # an agent without birth/death numbers: arrival order, as before
        assert _online_after(ingester, sqlite_engine, sender, ("status", _status(True, t - 100, 0))) is True
    finally:
        sender.close()
