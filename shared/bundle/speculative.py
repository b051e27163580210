"""Hash a bundle file's blobs before the manifest that vouches for them has been verified.

Why: ``edgefleet bundle verify`` of a 200 MB bundle spends about as long importing the
verify path (argparse, msgspec, cryptography, tarfile: ~0.06 s of CPU) and checking the
envelope as hashing the blobs on two cores (~0.06 s). Done one after the other the process
was ~1.4x of ``mender-artifact validate``. Hashing is GIL-free (``os.preadv`` and hashlib
release it for large buffers), so the CLI starts it on worker threads (one less than the
CPUs) as soon as it sees ``bundle verify FILE``, the imports and the signature check run
meanwhile on the main thread, which then hashes beside the workers what is left (three
threads on two cores cost more CPU and ran slower).

Nothing here is trusted, and nothing here decides anything:

- the layout is a guess: blob offsets and sizes come from a minimal walk of the unverified tar
  headers, and a blob's chunk size is the one the builder would pick for its size
  (``choose_chunk_size``; blobs under ``DEFAULT_MIN_CHUNKED_FILE`` are hashed whole);
- the result is only a map ``(offset in the bundle, length) -> sha256 hex`` of the bytes
  read there. ``parallel_verify.verify_in_place`` compares an entry with the manifest's hash
  only for a range it would itself have read (the vetted member offset and the signed
  chunk size), after the envelope verified and ``check_members`` vetted the members; every
  other range is read and hashed again, so a wrong guess costs time, never correctness;
- a short read records nothing (the normal path then reports the truncation), and the
  digests are dropped when the file is no longer the same one (device, inode, size, mtime).

While the threads run, the interpreter's switch interval is lowered (``SWITCH_INTERVAL``,
restored when they are joined): a worker needs the GIL for a moment after each read and each
chunk's hash, and with the default 5 ms it would wait that long whenever the main thread is
busy importing, hashing a few chunks per 5 ms instead of one per ~0.6 ms.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import threading
from collections.abc import Iterable

from shared.bundle.chunks import DEFAULT_MIN_CHUNKED_FILE, choose_chunk_size, chunk_count, chunk_span

Range = tuple[int, int]  # (offset in the bundle file, length)

READ = 1 << 20
MAX_MEMBERS = 64  # a bundle holds the envelope and a few blobs; stop guessing beyond this
SWITCH_INTERVAL = 0.0005  # seconds
_BLOCK = 512


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_size(records: bytes) -> int | None:
    for line in records.split(b"\n"):
        _, _, record = line.partition(b" ")
        if record.startswith(b"size="):
            return int(record[5:])
    return None


def guess_members(fd: int, file_size: int) -> list[Range]:
    """(data offset, size) of each regular member after the first (the envelope), from the
    unverified headers; stops quietly at anything unexpected."""
    out: list[Range] = []
    pos, index, pax_size = 0, 0, None
    try:
        while pos + _BLOCK <= file_size and index < MAX_MEMBERS:
            header = os.pread(fd, _BLOCK, pos)
            if len(header) < _BLOCK or header[124] & 0x80 or not header.strip(b"\0"):
                break
            kind, size, data = header[156:157], _octal(header[124:136]), pos + _BLOCK
            if kind in (b"x", b"g"):
                if kind == b"x":
                    pax_size = _pax_size(os.pread(fd, min(size, 1 << 16), data))
            else:
                if pax_size is not None:
                    size, pax_size = pax_size, None
                if kind in (b"0", b"\0") and index > 0:
                    out.append((data, size))
                if data + size > file_size:  # past the end: truncated, or lying; nothing after it
                    break
                index += 1
            pos = data + -(-size // _BLOCK) * _BLOCK
    except (ValueError, OSError):
        pass
    return out


def plan(members: Iterable[Range], file_size: int) -> list[Range]:
    """The ranges to hash: a blob's guessed chunks, or the whole blob when it is small; only
    ranges that start inside the file (a header may claim any size)."""
    ranges: list[Range] = []
    for offset, size in members:
        if size >= DEFAULT_MIN_CHUNKED_FILE:
            step = choose_chunk_size(size)
            inside = chunk_count(max(0, file_size - offset), step)
            for i in range(min(chunk_count(size, step), inside)):
                off, length = chunk_span(i, size, step)
                ranges.append((offset + off, length))
        elif size > 0:
            ranges.append((offset, size))
    return ranges


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):  # into the thread's buffer: no allocation per read
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Speculation:
    """Worker threads hashing the planned ranges of one open file (``workers - 1`` of them,
    at least one: the thread that asks for the digests becomes the last worker)."""

    def __init__(self, fd: int, ranges: list[Range], workers: int) -> None:
        self._fd = fd
        self._identity = _identity(os.fstat(fd))
        self.ranges = ranges
        self._digests: dict[Range, str] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = False
        self._closed = False
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL))
        self._threads = [threading.Thread(target=self._work, name=f"speculative-hash-{i}", daemon=True)
                         for i in range(max(1, min(workers - 1, len(ranges))))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        buf = bytearray(READ)
        view = memoryview(buf)
        while not self._stop:
            with self._lock:
                i = self._next
                self._next += 1
            if i >= len(self.ranges):
                return
            offset, length = self.ranges[i]
            digest = hashlib.sha256()
            pos, end = offset, offset + length
            try:
                while pos < end and not self._stop:
                    n = _read_into(self._fd, view[:min(READ, end - pos)], pos)
                    if n <= 0:
                        break
                    digest.update(view[:n])
                    pos += n
            except OSError:
                return
            if pos == end:
                self._digests[(offset, length)] = digest.hexdigest()

    def _join(self) -> tuple[int, int, int, int] | None:
        """Wait for the threads, close the file; the file's identity then (None if closed)."""
        for thread in self._threads:
            thread.join()
        if self._closed:
            return None
        self._closed = True
        sys.setswitchinterval(self._switch)
        try:
            return _identity(os.fstat(self._fd))
        finally:
            os.close(self._fd)

    def cancel(self) -> None:
        """Stop hashing (each thread finishes at most its current read) and close the file."""
        self._stop = True
        self._join()

    def digests(self, path: str | os.PathLike[str], wanted: Iterable[Range]) -> dict[Range, str]:
        """Digests of the ``wanted`` ranges that were hashed, once every thread is done; none
        when ``path`` is no longer the file that was read or no wanted range was planned."""
        wanted = set(wanted)
        if wanted.isdisjoint(self.ranges):
            self.cancel()
            return {}
        if not self._closed:
            self._work()  # the caller hashes what is left beside the threads, as one more worker
        identity = self._join()
        try:
            same = identity == self._identity == _identity(os.stat(path))
        except OSError:
            same = False
        if not same:
            return {}
        return {r: d for r, d in self._digests.items() if r in wanted}


def start(path: str | os.PathLike[str], workers: int | None = None) -> Speculation | None:
    """Start hashing the blobs of the bundle at ``path``; None when there is nothing to guess
    (unreadable or not a regular file, no blob found)."""
    try:  # O_NONBLOCK: a FIFO given as FILE must not hang here (argparse has not run yet)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        ranges = plan(guess_members(fd, st.st_size), st.st_size) if stat.S_ISREG(st.st_mode) else []
        if not ranges:
            os.close(fd)
            return None
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return Speculation(fd, ranges, workers or 1)
    except BaseException:
        os.close(fd)
        raise
