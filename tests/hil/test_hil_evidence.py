"""The evidence that a HIL fault fired: the spool reader against the agent's real spool, the
counters of nftables and netem as the tools print them, and the judgement of each fault."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from agent.telemetry.spool import Spool
from hil.evidence import (
    count_records,
    judge,
    parse_netem_stats,
    parse_nft_counters,
    parse_spool_listing,
    records_since,
    spool_cursor,
    spool_end,
)
from hil.ssh import InventoryDevice, SshCommands


def test_the_spool_readers_follow_the_agents_own_spool(tmp_path: Path) -> None:
    assert spool_end(tmp_path) is None and spool_cursor(tmp_path) is None  # no spool yet
    spool = Spool(tmp_path / "telemetry_spool", max_bytes=64 * 1024, segment_bytes=600, cursor_sync_s=0)
    spool.append("health", b"before")
    start = spool_end(tmp_path)
    assert start is not None and records_since(tmp_path, start) == 0
    for i in range(12):  # over several segments, as during an outage: nothing acknowledged
        assert spool.append("health" if i % 3 else "event", b"x" * (40 + i))
    end = spool_end(tmp_path)
    assert records_since(tmp_path, start) == 12 and end is not None and end[0] > start[0]
    for token, _kind, _payload in spool.take(20):  # the broker is back: all acknowledged
        spool.ack(token)
    spool.sync()
    cursor = spool_cursor(tmp_path)
    assert cursor is not None and cursor >= end
    spool.close()


def test_the_ssh_spool_commands_read_the_same_spool(tmp_path: Path) -> None:
    """The shell lines ssh mode runs on a device, run here as root would run them there."""
    cmd = SshCommands(InventoryDevice(id="x", host="h", user="root", state_dir=str(tmp_path)))

    def on_device(argv: list[str]) -> str:
        return subprocess.run(["sh", "-c", argv[-1]], capture_output=True, text=True, check=True).stdout

    assert parse_spool_listing(on_device(cmd.spool_listing())) == (None, [])  # no spool yet
    spool = Spool(tmp_path / "telemetry_spool", max_bytes=64 * 1024, segment_bytes=600, cursor_sync_s=0)
    spool.append("event", b"first")
    for token, _kind, _payload in spool.take(1):
        spool.ack(token)
    spool.sync()
    start = spool_end(tmp_path)
    for i in range(9):
        spool.append("health", b"y" * (50 + i))
    cursor, segments = parse_spool_listing(on_device(cmd.spool_listing()))
    assert cursor == spool_cursor(tmp_path) and segments[-1] == spool_end(tmp_path)
    assert start is not None
    tails = [on_device(cmd.spool_tail(seg, start[1] if seg == start[0] else 0))
             for seg, _ in segments if seg >= start[0]]
    assert sum(count_records(base64.b64decode(t))[0] for t in tails) == records_since(tmp_path, start) == 9
    spool.close()


def test_a_torn_record_ends_the_count() -> None:
    record = b"\xefS" + bytes([1]) + (3).to_bytes(4, "little") + b"\0\0\0\0" + b"abc"
    assert count_records(record * 2) == (2, 2 * len(record))
    assert count_records(record * 2 + record[:9]) == (2, 2 * len(record))
    assert count_records(b"junk" + record) == (0, 0)


NFT = """table inet hil {
	chain in {
		type filter hook input priority filter; policy accept;
		tcp sport { 1883, 8000 } counter packets 410 bytes 51200
		tcp sport { 1883, 8000 } numgen random mod 100 < 20 counter packets 79 bytes 9000 drop
	}
	chain out {
		type filter hook output priority filter; policy accept;
		tcp dport { 1883, 8000 } counter packets 390 bytes 40000
		tcp dport { 1883, 8000 } numgen random mod 100 < 20 counter packets 81 bytes 8000 drop
	}
}
"""
NETEM = """qdisc netem 8001: root refcnt 2 limit 1000 loss 20%
 Sent 123456 bytes 800 pkt (dropped 200, overlimits 0 requeues 0)
 backlog 0b 0p requeues 0
"""


def test_loss_counters_as_the_tools_print_them() -> None:
    assert parse_nft_counters(NFT) == (800, 160)
    assert parse_netem_stats(NETEM) == (1000, 200)
    assert parse_nft_counters("") == (0, 0) and parse_netem_stats("qdisc noqueue 0: root") == (0, 0)


def _entry(action: str, evidence: dict, **asked: object) -> dict:
    return {"t": 1.0, "action": action, "device": "dev-01", "primary": True, "evidence": evidence,
            "asked": {"when_state": None, "value": None, "after_rollout": False, **asked}, "result": "done"}


def test_a_power_cut_counts_only_in_the_state_it_names() -> None:
    ok, detail = judge(_entry("power_cut", {"state_at_cut": "downloading", "active_release": 1},
                              when_state="downloading"), None)
    assert ok and "downloading r1" in detail
    device = {"events": [{"t": 0.5, "state": "downloading", "active_release": 1},
                         {"t": 1.0, "action": "power_cut"},
                         {"t": 2.5, "state": "verifying", "active_release": 1},
                         {"t": 4.0, "state": "committed", "active_release": 3}]}
    ok, detail = judge(_entry("power_cut", {"state_at_cut": "downloading", "active_release": 1},
                              when_state="downloading"), device)
    assert ok and detail == "state file at the cut: downloading r1; then verifying r1 -> committed r3"
    ok, detail = judge(_entry("power_cut", {"state_at_cut": "verifying", "active_release": 1},
                              when_state="downloading"), None)
    assert not ok and detail.startswith("meant for downloading, landed in verifying")
    ok, detail = judge(_entry("power_cut", {"state_at_cut": "trial", "survivors": [4242]}), None)
    assert not ok and "4242" in detail
    never = {**_entry("power_cut", {}, when_state="trial"), "skipped": "the state file never showed trial"}
    assert judge(never, None) == (False, "not applied: the state file never showed trial")


def test_a_full_disk_counts_only_when_the_device_met_it() -> None:
    filled = _entry("disk_full", {"free_kib": 60})
    device = {"state": "committed", "reason": None,
              "events": [{"t": 3.0, "state": "committed", "active_release": 1}]}
    ok, detail = judge(filled, device)
    assert not ok and "never reported disk_full" in detail and "60 KiB free" in detail
    device["events"].append({"t": 4.0, "state": "failed", "active_release": 1, "reason": "disk_full"})
    ok, detail = judge(filled, device)
    assert ok and "disk_full at 4.0 s" in detail and "serving r1" in detail
    device["events"].append({"t": 5.0, "state": "failed", "active_release": None, "reason": "disk_full"})
    assert judge(filled, device)[0] is False  # while serving nothing: not what the scenario means


def test_loss_counts_when_its_counters_show_it() -> None:
    assert judge(_entry("loss", {"mechanism": "nftables", "packets": 800, "dropped": 160}, value=20),
                 None) == (True, "nftables: 160 of 800 packets dropped (20.0%, asked 20%: 160 ± 46)")
    assert not judge(_entry("loss", {"mechanism": "nftables", "packets": 800, "dropped": 0}, value=20),
                     None)[0]
    ok, detail = judge(_entry("loss", {"mechanism": "netem", "packets": 800, "dropped": 700}, value=20), None)
    assert not ok and "not the loss asked" in detail
    # a short run: 4 of 30 is within chance of 20%, 0 of 30 is not a loss at all
    assert judge(_entry("loss", {"mechanism": "nftables", "packets": 30, "dropped": 2}, value=20), None)[0]


def test_a_broker_outage_counts_when_every_spool_held_it() -> None:
    spools = {"dev-01": {"start": [1, 900], "spooled": 7, "end": [1, 1600], "cursor_after": [1, 1900]},
              "dev-02": {"start": [2, 0], "spooled": 6, "end": [3, 100], "cursor_after": [3, 100]}}
    ok, detail = judge(_entry("broker_stop", {"port_closed": True, "spools": spools}), None)
    assert ok and "dev-01 7, dev-02 6" in detail
    spools["dev-02"]["cursor_after"] = [2, 4000]  # not past what it spooled during the outage
    ok, detail = judge(_entry("broker_stop", {"port_closed": True, "spools": spools}), None)
    assert not ok and "dev-02 spooled during the outage was never acknowledged" in detail
    spools["dev-02"].update(spooled=1, cursor_after=[3, 100])
    ok, detail = judge(_entry("broker_stop", {"port_closed": True, "spools": spools}), None)
    assert not ok and "dev-02 took fewer than 2 records" in detail
    assert not judge(_entry("broker_stop", {"port_closed": False, "spools": spools}), None)[0]
    unread = {"dev-01": {"start": None, "spooled": None, "end": None, "cursor_after": None}}
    ok, detail = judge(_entry("broker_stop", {"port_closed": True, "spools": unread}), None)
    assert not ok and "no device's spool could be read" in detail


def test_a_late_device_counts_when_it_stayed_off_through_the_rollouts_end() -> None:
    on = _entry("power_on", {"off_s": 30.5, "off_through_rollout_end": True}, after_rollout=True)
    assert judge(on, None) == (True, "off for 30.5 s, through the rollout's end; done")
    on["evidence"]["off_through_rollout_end"] = False
    assert not judge(on, None)[0]
