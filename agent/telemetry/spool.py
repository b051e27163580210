"""Store-and-forward on disk: every health and event message waits here until the broker acked it.

Layout (``state_dir/telemetry_spool/``)::

    0000000000000007.seg   append-only segments, oldest first, of records
    cursor.json            {"segment": 7, "offset": 1234}: where the first un-acked record starts

A record is ``MAGIC(2) kind(1) length(4, LE) crc32(4, LE) payload``; the CRC covers the kind
byte and the payload. The payload is the message as it goes on the wire, in the encoding
``[mqtt] encoding`` had when it was made (MessagePack or JSON): records spooled before a change
of that setting are sent as they are, and readers tell the two apart by the first byte. Rules:

- appends go to the newest segment, which rolls over at ``segment_bytes``; each record is one
  ``write``. Events are fsynced at once; health is fsynced at most every ``health_sync_s``
  (and with the next event or roll): a kill -9 loses nothing (the page cache survives), a
  power cut may lose the last seconds of health, never an acknowledged event;
- ``take`` hands out records in order, past those already in flight; ``ack`` marks one as
  acknowledged; the head advances over the acknowledged prefix only, so nothing is removed
  before the broker has it. A segment wholly behind the head is deleted. The cursor is
  written at most every ``cursor_sync_s``: after a crash, at most that much is sent again
  (delivery is at least once; readers dedupe by ``seq``);
- bounded by ``max_bytes`` on disk. When an append would pass it, the oldest segments that
  hold no in-flight record are rewritten without their health records (neighbouring
  event-only leftovers are merged); only when no health is left are the oldest events
  dropped. Drops are counted by kind;
- on open every segment is scanned: a torn or corrupt record (a crash in the middle of a
  write) ends its segment there; the rest of that file is cut off and counted, never fatal.

Memory stays bounded: per segment a few counters; records are read from disk one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import msgspec

log = logging.getLogger(__name__)

SPOOL_DIR = "telemetry_spool"
CURSOR_FILE = "cursor.json"
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MIN_MAX_BYTES = 4096
MAGIC = b"\xefS"
HEADER = struct.Struct("<2sBII")
KINDS = {"health": 1, "event": 2}
KIND_NAMES = {v: k for k, v in KINDS.items()}
MAX_RECORD_BYTES = 1 << 20
DROP_LOG_EVERY_S = 60.0


class _Segment(msgspec.Struct):
    id: int
    path: Path
    size: int = 0  # bytes of whole, valid records
    counts: dict[str, int] = msgspec.field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def records(self) -> int:
        return sum(self.counts.values())


class _InFlight(msgspec.Struct):
    token: int
    segment: int
    start: int
    end: int
    acked: bool = False


class SpoolStats(msgspec.Struct, frozen=True):
    pending: int  # records not yet acknowledged (in flight included)
    bytes: int  # on disk
    dropped: dict[str, int]  # by kind ("health", "event", "torn") since this spool was opened


def _seg_name(seg_id: int) -> str:
    return f"{seg_id:016d}.seg"


def encode_record(kind: str, payload: bytes) -> bytes:
    code = KINDS[kind]
    crc = zlib.crc32(payload, zlib.crc32(bytes([code])))
    return HEADER.pack(MAGIC, code, len(payload), crc) + payload


def _read_record(fh: BinaryIO, offset: int, limit: int) -> tuple[str, bytes, int] | None:
    """The record at ``offset`` (kind, payload, end), or None when it is torn or corrupt."""
    fh.seek(offset)
    head = fh.read(HEADER.size)
    if len(head) < HEADER.size or offset + HEADER.size > limit:
        return None
    magic, code, length, crc = HEADER.unpack(head)
    end = offset + HEADER.size + length
    if magic != MAGIC or code not in KIND_NAMES or length > MAX_RECORD_BYTES or end > limit:
        return None
    payload = fh.read(length)
    if len(payload) != length or zlib.crc32(payload, zlib.crc32(bytes([code]))) != crc:
        return None
    return KIND_NAMES[code], payload, end


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
        health_sync_s: float = 30.0,
        cursor_sync_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"spool max_bytes {max_bytes} must be at least {MIN_MAX_BYTES}")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        # Eight or more segments per bound: dropping works a segment at a time.
        self.segment_bytes = segment_bytes or min(1 << 20, max(512, max_bytes // 8))
        self.health_sync_s = health_sync_s
        self.cursor_sync_s = cursor_sync_s
        self.clock = clock
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._order: deque[int] = deque()  # segment ids, oldest first
        self._active: int | None = None  # the segment appends go to
        self._next_id = 1
        self._fd: int | None = None
        self._dirty = False  # appended but not fsynced
        self._last_sync = clock()
        self._head = (0, 0)  # first un-acked record
        self._send = (0, 0)  # next record to hand out
        self._inflight: deque[_InFlight] = deque()
        self._token = 0
        self._pending = 0
        self._cursor_dirty = False
        self._last_cursor = clock()
        self._reader: tuple[int, BinaryIO] | None = None
        self._last_drop_log: float | None = None
        self.dropped: dict[str, int] = {"health": 0, "event": 0, "torn": 0}
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()

    # -- opening ------------------------------------------------------------------------

    def _open(self) -> None:
        for p in self.dir.glob("*.tmp"):
            p.unlink(missing_ok=True)
        ids = sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit())
        cursor = self._read_cursor()
        # Segment ids only grow, also past the cursor's: a new segment is never taken for an old one.
        self._next_id = max((ids[-1] + 1) if ids else 1, (cursor[0] + 1) if cursor else 1)
        head: tuple[int, int] | None = None
        for seg_id in ids:
            scanned = self._scan(seg_id, cursor)
            if scanned is None:
                continue
            seg, cursor_ok = scanned
            self._segments[seg_id] = seg
            self._order.append(seg_id)
            if head is None and cursor is not None and seg_id >= cursor[0]:
                # The first segment at or after the cursor; a cursor off a record boundary
                # (damage) sends that whole segment again rather than lose anything.
                head = (seg_id, cursor[1] if seg_id == cursor[0] and cursor_ok else 0)
        if head is None:
            head = (self._order[0], 0) if self._order and cursor is None else (self._next_id, 0)
        self._head = self._send = head
        self._pending = 0
        for seg_id in self._order:
            seg = self._segments[seg_id]
            if seg_id > head[0]:
                self._pending += seg.records
            elif seg_id == head[0]:
                self._pending += sum(1 for _ in self._iter(seg, head[1]))
        self._drop_behind_head()
        if self._pending:
            log.info("telemetry spool: %d message(s) from before the restart wait to be sent", self._pending)

    def _read_cursor(self) -> tuple[int, int] | None:
        try:
            doc = msgspec.json.decode((self.dir / CURSOR_FILE).read_bytes())
            seg, off = int(doc["segment"]), int(doc["offset"])
            if seg < 0 or off < 0:
                raise ValueError(f"negative position {seg}:{off}")
            return seg, off
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("telemetry spool cursor unreadable (%s); resending from the oldest record", exc)
            return None

    def _scan(self, seg_id: int, cursor: tuple[int, int] | None) -> tuple[_Segment, bool] | None:
        """Count a segment's valid records and cut off a torn tail; (segment, whether the cursor
        falls on a record boundary in it). None when nothing valid is left in the file."""
        path = self.dir / _seg_name(seg_id)
        seg = _Segment(seg_id, path)
        cursor_ok = cursor is not None and cursor[0] == seg_id and cursor[1] == 0
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                offset = 0
                while offset < size:
                    rec = _read_record(fh, offset, size)
                    if rec is None:
                        break
                    seg.counts[rec[0]] += 1
                    offset = rec[2]
                    if cursor is not None and cursor[0] == seg_id and cursor[1] == offset:
                        cursor_ok = True
        except OSError as exc:
            log.error("telemetry spool: cannot read %s (%s); skipping it", path, exc)
            return None
        seg.size = offset
        if offset < size:
            self.dropped["torn"] += 1
            log.warning("telemetry spool: %s has a torn or corrupt record at byte %d (%d bytes cut off)",
                        path.name, offset, size - offset)
            with contextlib.suppress(OSError):
                os.truncate(path, offset)
        if seg.size == 0:
            path.unlink(missing_ok=True)
            return None
        return seg, cursor_ok

    def _iter(self, seg: _Segment, offset: int = 0) -> Iterator[tuple[int, str, bytes, int]]:
        with open(seg.path, "rb") as fh:
            while offset < seg.size:
                rec = _read_record(fh, offset, seg.size)
                if rec is None:
                    log.error("telemetry spool: %s corrupt at byte %d; skipping the rest", seg.path.name,
                              offset)
                    self.dropped["torn"] += 1
                    seg.size = offset
                    return
                yield offset, rec[0], rec[1], rec[2]
                offset = rec[2]

    # -- appending ----------------------------------------------------------------------

    def append(self, kind: str, payload: bytes, max_payload: int | None = None) -> bool:
        """Store one message; False when it had to be dropped (counted): too big for the spool,
        or over ``max_payload`` (what the fleet and the broker accept)."""
        if max_payload is not None and len(payload) > max_payload:
            with self._lock:
                self.dropped[kind] += 1
            log.error("telemetry: a %d-byte %s message is over the %d bytes the fleet accepts; dropped",
                      len(payload), kind, max_payload)
            return False
        record = encode_record(kind, payload)
        with self._lock:
            if len(record) > self.max_bytes // 2:
                self.dropped[kind] += 1
                log.error("telemetry spool: a %d-byte %s message cannot be stored; dropped",
                          len(record), kind)
                return False
            self._make_room(len(record))
            try:
                self._write(kind, record)
            except OSError as exc:
                self.dropped[kind] += 1
                log.warning("telemetry spool: cannot store a %s message (%s); dropped", kind, exc)
                return False
            self._pending += 1
            return True

    def _write(self, kind: str, record: bytes) -> None:
        seg = self._segments.get(self._active) if self._active is not None else None
        if seg is None or seg.size >= self.segment_bytes or self._fd is None:
            seg = self._roll()
        assert self._fd is not None
        try:
            written = os.write(self._fd, record)
            if written != len(record):
                raise OSError(f"short write ({written} of {len(record)} bytes)")
        except OSError:
            # Never leave a torn record in front of later ones: cut back, or start a new segment.
            try:
                os.ftruncate(self._fd, seg.size)
            except OSError:
                self._close_fd()
            raise
        seg.size += len(record)
        seg.counts[kind] += 1
        self._dirty = True
        now = self.clock()
        if kind == "event" or now - self._last_sync >= self.health_sync_s:
            try:
                os.fsync(self._fd)
            except OSError as exc:  # the record is written; only its durability is in doubt
                log.warning("telemetry spool: fsync failed (%s)", exc)
            self._dirty = False
            self._last_sync = now

    def _roll(self) -> _Segment:
        self._close_fd()
        self._drop_behind_head()
        seg_id = self._next_id
        self._next_id += 1
        path = self.dir / _seg_name(seg_id)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        _fsync_dir(self.dir)
        seg = _Segment(seg_id, path)
        self._segments[seg_id] = seg
        self._order.append(seg_id)
        self._active = seg_id
        return seg

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self._dirty:
                    os.fsync(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            self._dirty = False
            self._active = None

    # -- the bound ------------------------------------------------------------------------

    def _bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    def _pinned(self, seg_id: int) -> bool:
        """Segments the head or a handed-out record is in: never rewritten."""
        return seg_id < self._send[0] or (seg_id == self._send[0] and self._send[1] > 0)

    def _make_room(self, need: int) -> None:
        if self._bytes() + need <= self.max_bytes:
            return
        if self._active is not None:
            self._close_fd()  # the newest segment may be rewritten too; appends go to a new one
        # First: the oldest health, segment by segment.
        for seg_id in list(self._order):
            if self._bytes() + need <= self.max_bytes:
                return
            seg = self._segments.get(seg_id)
            if seg is None or self._pinned(seg_id) or not seg.counts["health"]:
                continue
            try:
                self._compact(seg)
            except OSError as exc:
                # Rewriting needs space (a full disk): drop the whole segment instead.
                log.warning("telemetry spool: cannot rewrite %s (%s); dropping it", seg.path.name, exc)
                seg.path.with_suffix(".tmp").unlink(missing_ok=True)
                self._drop_segment(seg)
        # No health left outside the in-flight window: the oldest events go.
        for seg_id in list(self._order):
            if self._bytes() + need <= self.max_bytes:
                return
            seg = self._segments.get(seg_id)
            if seg is None or self._pinned(seg_id):
                continue
            self._drop_segment(seg)

    def _drop_segment(self, seg: _Segment) -> None:
        for kind, n in seg.counts.items():
            self.dropped[kind] += n
        self._pending -= seg.records
        self._remove(seg)
        self._note_drop()

    def _compact(self, seg: _Segment) -> None:
        """Rewrite ``seg`` without its health records, merged after an event-only predecessor."""
        idx = self._order.index(seg.id)
        prev = self._segments[self._order[idx - 1]] if idx > 0 else None
        # Event-only leftovers merge forward while small, so segments stay few.
        merge = (prev is not None and not self._pinned(prev.id) and not prev.counts["health"]
                 and prev.size < self.segment_bytes)
        tmp = seg.path.with_suffix(".tmp")
        new = _Segment(seg.id, seg.path)
        with open(tmp, "wb") as out:
            sources = ([prev] if merge and prev is not None else []) + [seg]
            for src in sources:
                for _off, kind, payload, _end in self._iter(src):
                    if kind == "health" and src is seg:
                        continue
                    rec = encode_record(kind, payload)
                    out.write(rec)
                    new.size += len(rec)
                    new.counts[kind] += 1
            out.flush()
            os.fsync(out.fileno())
        dropped = seg.counts["health"]
        self.dropped["health"] += dropped
        self._pending -= dropped
        if new.size == 0:
            tmp.unlink(missing_ok=True)
            self._remove(seg)
        else:
            os.replace(tmp, seg.path)
            self._segments[seg.id] = new
        if merge and prev is not None:
            # A crash before this unlink sends prev's events twice, never loses them.
            prev.path.unlink(missing_ok=True)
            self._segments.pop(prev.id, None)
            self._order.remove(prev.id)
        _fsync_dir(self.dir)
        if self._reader is not None:
            self._close_reader()
        self._note_drop()

    def _note_drop(self) -> None:
        """One warning per DROP_LOG_EVERY_S with the totals, not one per dropped segment."""
        now = self.clock()
        if self._last_drop_log is None or now - self._last_drop_log >= DROP_LOG_EVERY_S:
            self._last_drop_log = now
            log.warning("telemetry spool full (%d bytes): dropped %d health and %d event message(s) "
                        "so far, oldest health first", self.max_bytes, self.dropped["health"],
                        self.dropped["event"])

    def _remove(self, seg: _Segment) -> None:
        seg.path.unlink(missing_ok=True)
        self._segments.pop(seg.id, None)
        with contextlib.suppress(ValueError):
            self._order.remove(seg.id)
        if self._active == seg.id:
            self._close_fd()
        if self._reader is not None and self._reader[0] == seg.id:
            self._close_reader()

    # -- sending --------------------------------------------------------------------------

    def take(self, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` minus the in-flight count of the next records: (token, kind, payload)."""
        out: list[tuple[int, str, bytes]] = []
        with self._lock:
            while len(self._inflight) < limit:
                rec = self._next_record()
                if rec is None:
                    break
                seg_id, start, kind, payload, end = rec
                self._token += 1
                self._inflight.append(_InFlight(self._token, seg_id, start, end))
                self._send = (seg_id, end)
                out.append((self._token, kind, payload))
        return out

    def _next_record(self) -> tuple[int, int, str, bytes, int] | None:
        seg_id, offset = self._send
        for sid in list(self._order):
            if sid < seg_id:
                continue
            seg = self._segments[sid]
            if sid > seg_id:
                offset = 0
            if offset >= seg.size:
                continue
            fh = self._reader_for(seg)
            rec = _read_record(fh, offset, seg.size)
            if rec is None:
                log.error("telemetry spool: %s corrupt at byte %d; skipping the rest", seg.path.name, offset)
                self.dropped["torn"] += 1
                seg.size = offset
                continue
            return sid, offset, rec[0], rec[1], rec[2]
        return None

    def _reader_for(self, seg: _Segment) -> BinaryIO:
        if self._reader is None or self._reader[0] != seg.id:
            self._close_reader()
            self._reader = (seg.id, open(seg.path, "rb"))  # noqa: SIM115 - kept open across calls
        return self._reader[1]

    def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader[1].close()
            self._reader = None

    def ack(self, token: int) -> None:
        """The broker has the record ``token``; advance the head over the acknowledged prefix."""
        with self._lock:
            for item in self._inflight:
                if item.token == token:
                    item.acked = True
                    break
            else:
                return
            moved = False
            while self._inflight and self._inflight[0].acked:
                item = self._inflight.popleft()
                self._head = (item.segment, item.end)
                self._pending -= 1
                moved = True
            if moved:
                self._cursor_dirty = True
                self._drop_behind_head()
                if self.clock() - self._last_cursor >= self.cursor_sync_s:
                    self._save_cursor()

    def rewind(self, token: int) -> None:
        """``token`` and the records handed out after it were not sent: hand them out again."""
        with self._lock:
            for i, item in enumerate(self._inflight):
                if item.token == token:
                    self._send = (item.segment, item.start)
                    for _ in range(len(self._inflight) - i):
                        self._inflight.pop()
                    return

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _drop_behind_head(self) -> None:
        """Delete segments wholly behind the head (all acked); the active one stays."""
        head_seg, head_off = self._head
        removed = False
        for seg_id in list(self._order):
            seg = self._segments[seg_id]
            behind = seg_id < head_seg or (seg_id == head_seg and head_off >= seg.size)
            if not behind or seg_id == self._active:
                break
            self._remove(seg)
            removed = True
            if seg_id == head_seg:
                nxt = self._order[0] if self._order else seg_id + 1
                self._head = (nxt, 0)
                if self._send[0] == seg_id:
                    self._send = self._head
        if removed:
            self._save_cursor()

    def _save_cursor(self) -> None:
        try:
            self._write_cursor(self._head)
        except OSError as exc:
            log.warning("telemetry spool: cannot write the cursor (%s)", exc)
            return
        self._cursor_dirty = False
        self._last_cursor = self.clock()

    def _write_cursor(self, pos: tuple[int, int]) -> None:
        # No fsync: a lost cursor only sends acknowledged records again.
        tmp = self.dir / (CURSOR_FILE + ".tmp")
        tmp.write_bytes(msgspec.json.encode({"segment": pos[0], "offset": pos[1]}))
        os.replace(tmp, self.dir / CURSOR_FILE)

    # -- state ----------------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(pending=max(0, self._pending), bytes=self._bytes(), dropped=dict(self.dropped))

    def sync(self, *, force: bool = True) -> None:
        """fsync batched health and write the cursor: due ones only unless ``force`` (shutdown).
        The reporter calls it about once a second."""
        with self._lock:
            now = self.clock()
            due = force or now - self._last_sync >= self.health_sync_s
            if self._fd is not None and self._dirty and due:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                self._dirty = False
                self._last_sync = now
            if self._cursor_dirty and (force or now - self._last_cursor >= self.cursor_sync_s):
                self._save_cursor()

    def close(self) -> None:
        self.sync()
        with self._lock:
            self._close_fd()
            self._close_reader()


def read_all(directory: Path) -> list[tuple[str, bytes]]:
    """Every stored record in order (kind, payload), from the head on; for tools and tests."""
    spool = Spool(directory, max_bytes=1 << 40)
    try:
        out: list[tuple[str, bytes]] = []
        while True:
            batch = spool.take(1 << 30)
            if not batch:
                return out
            out.extend((kind, payload) for _t, kind, payload in batch)
    finally:
        spool.close()
