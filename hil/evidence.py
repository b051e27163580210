"""Evidence that a fault fired where its scenario says, and the judgement of it.

A fault the harness *applied* is not yet a fault the device *met*: a power cut meant for
"downloading" can land after the download, a filled disk can be left untouched by an
install, a loss rule can match no packet. So every applied fault carries evidence read from
outside the agent, from what its documentation promises:

- power cut: the agent's state file (``state_dir/models/<model>.json``, written atomically at
  every state change) read *after* the SIGKILL: the state it was in at the cut, and that no
  process of it survived;
- full disk: the free space left, and the state file's ``reason`` ``disk_full`` (the errno
  ENOSPC seen by the install) while it still served its release;
- loss: the nftables counters (packets seen, packets dropped) or netem's drop count;
- broker outage: the records the agent's telemetry spool (``state_dir/telemetry_spool/``,
  format in docs/telemetry.md and at the top of ``agent/telemetry/spool.py``) took while the
  broker was down, and its cursor past all of them once the broker is back (acknowledged).

``judge`` turns one fault's log entry into a report check (ok, detail); the readers below
parse what the kernel tools and the spool leave on disk. Pure code: text or bytes in.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

SPOOL_DIR = "telemetry_spool"
SPOOL_MAGIC = b"\xefS"
SPOOL_HEADER = struct.Struct("<2sBII")  # magic, kind, payload length, crc32
LOSS_SIGMAS = 4.0
MIN_SPOOL_GROWTH = 2  # records: an outage of a few seconds holds at least two health reports


SpoolPosition = tuple[int, int]  # (segment id, byte offset)


def _segments(spool: Path) -> list[int]:
    try:
        return sorted(int(p.stem) for p in spool.glob("*.seg") if p.stem.isdigit())
    except OSError:
        return []


def spool_end(state_dir: Path) -> SpoolPosition | None:
    """Where the spool's next record will be appended: its newest segment and that file's size."""
    spool = Path(state_dir) / SPOOL_DIR
    segments = _segments(spool)
    if not segments:
        return None
    try:
        return segments[-1], (spool / f"{segments[-1]:016d}.seg").stat().st_size
    except OSError:
        return None


def spool_cursor(state_dir: Path) -> SpoolPosition | None:
    """The first record not yet acknowledged by the broker, as the agent last wrote it down."""
    try:
        cursor = json.loads((Path(state_dir) / SPOOL_DIR / "cursor.json").read_text())
        return int(cursor["segment"]), int(cursor["offset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def records_since(state_dir: Path, start: SpoolPosition) -> int:
    """Whole records appended to the spool at or after ``start``: what the agent spooled since.

    Counted from the segments, not from the cursor: the agent writes its cursor about once a
    second, so a backlog taken against the cursor can shrink while the broker is away."""
    spool = Path(state_dir) / SPOOL_DIR
    n = 0
    for seg in _segments(spool):
        if seg < start[0]:
            continue
        try:
            data = (spool / f"{seg:016d}.seg").read_bytes()
        except OSError:
            continue
        n += count_records(data, start[1] if seg == start[0] else 0)[0]
    return n


def parse_spool_listing(text: str) -> tuple[SpoolPosition | None, list[tuple[int, int]]]:
    """(cursor, [(segment id, size)] oldest first) from ``SshCommands.spool_listing``'s output."""
    head, _, tail = text.partition("@@")
    cursor = None
    try:
        doc = json.loads(head)
        cursor = int(doc["segment"]), int(doc["offset"])
    except (ValueError, KeyError, TypeError):
        pass
    segments = []
    for line in tail.splitlines():
        name, _, size = line.strip().partition(" ")
        if name.endswith(".seg") and name[:-4].isdigit() and size.isdigit():
            segments.append((int(name[:-4]), int(size)))
    return cursor, sorted(segments)


def count_records(data: bytes, offset: int = 0) -> tuple[int, int]:
    """(records, bytes) of whole spool records in ``data`` from ``offset``."""
    n = 0
    pos = offset
    while pos + SPOOL_HEADER.size <= len(data):
        magic, _kind, length, _crc = SPOOL_HEADER.unpack_from(data, pos)
        end = pos + SPOOL_HEADER.size + length
        if magic != SPOOL_MAGIC or end > len(data):
            break
        n += 1
        pos = end
    return n, pos - offset


def parse_nft_counters(text: str) -> tuple[int, int]:
    """(packets seen, packets dropped) from ``nft list table inet hil``.

    Each chain has a ``counter`` before its random drop (every packet to or from the fleet
    and the broker) and one in the drop rule (the packets dropped)."""
    seen = dropped = 0
    for line in text.splitlines():
        m = re.search(r"counter packets (\d+) bytes \d+", line)
        if m is None:
            continue
        if "drop" in line[m.end():]:
            dropped += int(m.group(1))
        else:
            seen += int(m.group(1))
    return seen, dropped


def parse_netem_stats(text: str) -> tuple[int, int]:
    """(packets offered, packets dropped) from ``tc -s qdisc show``: sent plus dropped."""
    m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
    if m is None:
        return 0, 0
    sent, dropped = int(m.group(1)), int(m.group(2))
    return sent + dropped, dropped


def _power_cut(ev: dict[str, Any], when_state: str | None, t: float | None,
               device: dict[str, Any]) -> tuple[bool, str]:
    if ev.get("survivors"):
        return False, f"processes still running after SIGKILL: {ev['survivors']}"
    state = ev.get("state_at_cut")
    where = f"state file at the cut: {state} r{ev.get('active_release')}"
    after = [e for e in device.get("events", []) if "state" in e and t is not None and e["t"] > t]
    if after:  # what the device did about it, once its power came back
        steps = [f"{e['state']} r{e['active_release']}" for e in after]
        where += "; then " + " -> ".join(steps)
    if when_state is not None and state != when_state:
        return False, f"meant for {when_state}, landed in {state} ({where})"
    return True, where


def _disk_full(ev: dict[str, Any], device: dict[str, Any]) -> tuple[bool, str]:
    events = [e for e in device.get("events", []) if e.get("reason") == "disk_full"]
    filled = ev.get("free_kib")
    if not events:
        return False, (f"disk filled ({filled} KiB free) but the device never reported disk_full "
                       f"(its final state: {device.get('state')}, reason {device.get('reason')})")
    served = sorted({e.get("active_release") for e in events}, key=str)
    if None in served:
        return False, f"disk_full at {events[0]['t']} s while serving nothing"
    return True, (f"{filled} KiB free; disk_full at {events[0]['t']} s ({len(events)} time(s)) "
                  f"while serving r{', r'.join(str(r) for r in served)}")


def _loss(ev: dict[str, Any], value: float) -> tuple[bool, str]:
    """Each packet is dropped at random with the asked probability: the count dropped is binomial,
    so it must lie within LOSS_SIGMAS standard deviations of what was asked (a few dozen packets
    in a short run make a fixed tolerance in percent flaky)."""
    seen, dropped = ev.get("packets", 0), ev.get("dropped", 0)
    if not seen or not dropped:
        return False, f"{ev.get('mechanism')}: {dropped} of {seen} packets dropped: the loss never applied"
    p = min(max(value / 100.0, 0.0), 1.0)
    expected = seen * p
    bound = LOSS_SIGMAS * math.sqrt(seen * p * (1 - p)) + 1
    ok = abs(dropped - expected) <= bound
    return ok, (f"{ev.get('mechanism')}: {dropped} of {seen} packets dropped ({100.0 * dropped / seen:.1f}%, "
                f"asked {value:g}%: {expected:.0f} ± {bound:.0f})" + ("" if ok else ": not the loss asked"))


def _broker_stop(ev: dict[str, Any]) -> tuple[bool, str]:
    if not ev.get("port_closed"):
        return False, "the broker's port still took connections after the stop"
    spools: dict[str, dict[str, Any]] = ev.get("spools", {})
    if not spools or all(s.get("start") is None for s in spools.values()):
        return False, "no device's spool could be read when the broker stopped"
    figures = ", ".join(f"{d} {s.get('spooled')}" for d, s in sorted(spools.items()))
    quiet = sorted(d for d, s in spools.items() if (s.get("spooled") or 0) < MIN_SPOOL_GROWTH)
    if quiet:
        return False, (f"the spool of {', '.join(quiet)} took fewer than {MIN_SPOOL_GROWTH} records "
                       f"during the outage (records spooled: {figures})")
    unsent = sorted(d for d, s in spools.items()
                    if s.get("cursor_after") is None or s.get("end") is None
                    or tuple(s["cursor_after"]) < tuple(s["end"]))
    if unsent:
        return False, (f"what {', '.join(unsent)} spooled during the outage was never acknowledged "
                       f"after it (records spooled: {figures})")
    return True, f"records spooled while the broker was down, all acknowledged after it: {figures}"


def judge(entry: dict[str, Any], device: dict[str, Any] | None) -> tuple[bool, str]:
    """Did this fault fire where its scenario says? (ok, the figures that say so). ``entry`` is
    the fault's log entry (``asked``: what the scenario asked; ``evidence``: what was read);
    ``device`` the report of the device it hit."""
    asked = entry.get("asked") or {}
    if "skipped" in entry:
        return False, f"not applied: {entry['skipped']}"
    ev = entry.get("evidence") or {}
    action = entry["action"]
    if action == "power_cut":
        return _power_cut(ev, asked.get("when_state"), entry.get("t"), device or {})
    if action == "disk_full":
        return _disk_full(ev, device or {})
    if action == "loss":
        return _loss(ev, float(asked.get("value") or 0))
    if action == "broker_stop":
        return _broker_stop(ev)
    if action == "power_on" and asked.get("after_rollout"):
        if not ev.get("off_through_rollout_end"):
            return False, "the device was back on before the rollout ended"
        return True, f"off for {ev.get('off_s')} s, through the rollout's end; {entry.get('result')}"
    return True, str(entry.get("result"))
