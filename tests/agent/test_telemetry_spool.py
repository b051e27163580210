"""The on-disk telemetry spool: order, acknowledgement, the bound (oldest health first),
restarts, torn records and kill -9 of a writing process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.telemetry.spool import Spool, encode_record, read_all

REPO = Path(__file__).resolve().parents[2]


def msg(seq: int, pad: int = 0) -> bytes:
    return json.dumps({"seq": seq, "pad": "x" * pad}).encode()


def seqs(records: list[tuple[str, bytes]]) -> list[int]:
    return [json.loads(p)["seq"] for _k, p in records]


def drain(spool: Spool, window: int = 4) -> list[tuple[str, bytes]]:
    out = []
    while batch := spool.take(window):
        for token, kind, payload in batch:
            out.append((kind, payload))
            spool.ack(token)
    return out


def test_order_ack_and_restart(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    for i in range(30):
        sp.append("event" if i % 5 == 0 else "health", msg(i))
    assert sp.stats().pending == 30
    first = sp.take(10)
    assert [json.loads(p)["seq"] for _t, _k, p in first] == list(range(10))
    assert sp.take(10) == []  # the window is full until something is acknowledged
    # Out-of-order acks: the head moves over the acknowledged prefix only.
    sp.ack(first[2][0])
    sp.ack(first[0][0])
    assert sp.stats().pending == 29
    sp.ack(first[1][0])
    assert sp.stats().pending == 27
    sp.close()
    # Restart: everything not acknowledged comes again, in order (in-flight ones included).
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert sp.stats().pending == 27
    got = drain(sp)
    assert seqs(got) == list(range(3, 30))
    assert [k for k, _ in got][2] == "event"  # seq 5
    sp.close()
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert sp.stats().pending == 0 and sp.take(5) == []
    # Fully acknowledged segments are deleted; only the newest may stay.
    assert len(list(tmp_path.glob("*.seg"))) <= 1
    sp.append("health", msg(30))
    assert seqs(drain(sp)) == [30]


def test_rewind_hands_out_again(tmp_path: Path) -> None:
    sp = Spool(tmp_path, segment_bytes=100)
    for i in range(6):
        sp.append("health", msg(i))
    batch = sp.take(4)
    sp.ack(batch[0][0])
    sp.rewind(batch[2][0])  # records 2 and 3 never reached the client
    again = sp.take(4)
    assert [json.loads(p)["seq"] for _t, _k, p in again] == [2, 3, 4]
    for token, _k, _p in again:
        sp.ack(token)
    assert sp.stats().pending == 5  # the head waits for record 1; 2-4 are removed with it
    sp.ack(batch[1][0])
    assert seqs(drain(sp)) == [5] and sp.stats().pending == 0


def test_bound_drops_oldest_health_keeps_events(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=8192)
    events = []
    for i in range(400):
        kind = "event" if i % 25 == 0 else "health"
        if kind == "event":
            events.append(i)
        sp.append(kind, msg(i, pad=40))
    st = sp.stats()
    assert st.bytes <= 8192
    assert st.dropped["event"] == 0 and st.dropped["health"] > 250
    got = drain(sp, window=16)
    kinds = {json.loads(p)["seq"]: k for k, p in got}
    got_seqs = seqs(got)
    assert got_seqs == sorted(got_seqs)
    assert [s for s in got_seqs if kinds[s] == "event"] == events  # every event kept, in order
    health = [s for s in got_seqs if kinds[s] == "health"]
    # The health that survived is the newest: a contiguous run up to the last message.
    assert health[-1] == 399 and health == [s for s in range(health[0], 400) if s % 25]
    assert len(got) + st.dropped["health"] == 400
    assert len(list(tmp_path.glob("*.seg"))) <= 16  # event-only leftovers were merged


def test_bound_drops_oldest_events_when_no_health_is_left(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=4096)
    for i in range(200):
        sp.append("event", msg(i, pad=40))
    st = sp.stats()
    assert st.bytes <= 4096 and st.dropped["event"] > 0 and st.dropped["health"] == 0
    got = seqs(drain(sp))
    assert got == list(range(200 - len(got), 200))
    assert st.dropped["event"] + len(got) == 200


def test_in_flight_records_are_not_dropped(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=4096)
    for i in range(10):
        sp.append("health", msg(i, pad=40))
    window = sp.take(3)  # handed to the MQTT client; the broker then goes away
    for i in range(10, 200):
        sp.append("health", msg(i, pad=40))
    for token, _k, _p in window:
        sp.ack(token)
    got = seqs(drain(sp))
    assert got[-1] == 199 and got == sorted(got)
    assert sp.stats().dropped["health"] + len(got) + 3 == 200


def test_torn_last_record_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sp = Spool(tmp_path)
    for i in range(5):
        sp.append("health", msg(i))
    sp.close()
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    with open(seg, "ab") as fh:
        fh.write(encode_record("event", msg(5))[:-3])  # a write cut short by kill -9
    sp = Spool(tmp_path)
    assert "torn" in caplog.text and sp.stats().dropped["torn"] == 1
    sp.append("event", msg(6))
    assert seqs(drain(sp)) == [0, 1, 2, 3, 4, 6]
    sp.close()
    # Garbage cursor and garbage segment files are not fatal either.
    (tmp_path / "cursor.json").write_bytes(b"{nope")
    (tmp_path / "0000000000009999.seg").write_bytes(b"\x00" * 50)
    sp = Spool(tmp_path)
    sp.append("health", msg(7))
    assert seqs(drain(sp))[-1] == 7


WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from agent.telemetry.spool import Spool
    sp = Spool(Path(sys.argv[1]), max_bytes=1 << 24, segment_bytes=4096)
    print("ready", flush=True)
    i = 0
    while True:
        sp.append("event" if i % 7 == 0 else "health", json.dumps({"seq": i, "pad": "y" * 100}).encode())
        i += 1
    """
)


def test_kill_9_while_appending(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(0.4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    got = seqs(read_all(tmp_path))
    assert len(got) > 100
    assert got == list(range(len(got)))  # a prefix, in order, nothing missing in between


def test_seq_continues_without_gap_after_a_clean_stop(tmp_path: Path) -> None:
    from agent.telemetry.sequence import SeqCounter

    a = SeqCounter(tmp_path / "seq.json", block=100)
    used = [a.next() for _ in range(7)]
    a.close()
    b = SeqCounter(tmp_path / "seq.json", block=100)
    assert b.next() == used[-1] + 1
    c = SeqCounter(tmp_path / "seq.json", block=100)  # b crashed: c skips b's block, never reuses
    assert c.next() >= used[-1] + 100


def test_a_message_over_the_fleet_s_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    """The broker and the fleet refuse payloads over messages.MAX_MESSAGE_BYTES: the agent never
    spools one (counted as dropped), and the messages after it are sent as usual."""
    from shared.telemetry import messages

    spool = Spool(tmp_path / "spool")
    limit = messages.MAX_MESSAGE_BYTES
    assert not spool.append("health", b"x" * (limit + 1), limit)
    assert spool.append("health", b"x" * limit, limit)
    stats = spool.stats()
    assert (stats.dropped["health"], stats.pending) == (1, 1)
    spool.close()
