"""Birth and death pair like Sparkplug's bdSeq, against a real Mosquitto and a real agent
process: the last will carries its connection's number and a time after the birth it closes;
a reconnect arms a new will; "newest wins" (messages.status_supersedes) ends offline after a
kill -9 and online after the next birth."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from shared.telemetry import messages

from . import test_reporter
from .test_reporter import Listener, _start_agent

listener, offline_config = test_reporter.listener, test_reporter.offline_config  # its fixtures


def _statuses(subscriber: Listener) -> list[messages.Status]:
    return [m for k, _r, m in subscriber.find(lambda k, r, m: k == "status")]


def _newest(statuses: list[messages.Status]) -> messages.Status:
    best = statuses[0]
    for s in statuses[1:]:
        if messages.status_supersedes(s, best):
            best = s
    return best


def test_the_will_closes_its_own_birth_and_orders_after_it(
    offline_config: Path, mosquitto: Any, listener: Listener, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    proc = _start_agent(offline_config, log)
    try:
        first = listener.wait(lambda k, r, m: k == "status" and m.online, 20, "birth")
        mosquitto.stop()  # the connection drops without a will (the broker is gone)
        mosquitto.start()
        second = listener.wait(lambda k, r, m: k == "status" and m.online and m.bd_seq != first.bd_seq,
                               30, "the birth of the next connection")
        assert second.bd_seq > first.bd_seq > 0 and second.ts > first.ts
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # (a connection attempt dropped while the broker came back may leave its own will:
        # an older number and time, which newest-wins orders before this birth)
        will = listener.wait(lambda k, r, m: k == "status" and not m.online and m.bd_seq == second.bd_seq,
                             30, "the last will of the second connection")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The will armed at the second CONNECT: that connection's number, stamped after its birth
    assert will.bd_seq == second.bd_seq and will.ts > second.ts
    assert will.session == second.session
    assert _newest(_statuses(listener)).online is False
    # In any arrival order, newest wins ends offline
    assert _newest([will, second, first]).online is False and _newest([first, will, second]) == will

    proc = _start_agent(offline_config, log)
    try:
        third = listener.wait(lambda k, r, m: k == "status" and m.online and m.ts > will.ts, 20,
                              "the birth after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert messages.status_supersedes(third, will) and not messages.status_supersedes(will, third)
    clean = listener.wait(lambda k, r, m: k == "status" and not m.online and m.ts > third.ts, 10,
                          "the clean offline")
    assert clean.bd_seq == third.bd_seq and _newest(_statuses(listener)).online is False
