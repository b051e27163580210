"""Hash-check a bundle file's blobs in place, in parallel on all cores.

The tar members were vetted by ``check_members`` (names, sizes, no links) against a
verified manifest; this module only reads their bytes with ``os.pread`` at each member's
data offset and checks them:

- a blob whose manifest entry lists chunks is checked chunk by chunk: every chunk hash is
  signed in the manifest and the chunks cover the file exactly (``validate_chunks``), so a
  file whose every chunk matches is the signed file; chunks are hashed on a thread pool
  (hashlib releases the GIL for large buffers);
- a blob without chunks is hashed whole, as one task of the pool;
- a short read (truncated bundle) is a LengthMismatchError, a differing hash a
  HashMismatchError, both naming the file (role and sha256) and the chunk;
- ``known`` digests (``shared.bundle.speculative``: hashed while the envelope was being
  verified) stand for reading a task's bytes only when their range is exactly the task's
  (its vetted offset and length); they are compared with the manifest here, like any other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

from shared.bundle.chunks import chunk_span
from shared.bundle.manifest import FileRef, Manifest
from shared.errors import HashMismatchError, LengthMismatchError

READ = 1 << 20


class _Task(NamedTuple):
    role: str
    sha256: str
    offset: int  # in the bundle file
    length: int
    expected: str
    chunk: int | None  # None: the whole file


def _tasks(manifest: Manifest, data_offsets: dict[str, int]) -> list[_Task]:
    tasks = []
    for role, ref in manifest.files.items():
        base = data_offsets[ref.sha256]
        if ref.chunks and ref.chunk_size:
            for i, h in enumerate(ref.chunks):
                off, length = chunk_span(i, ref.size, ref.chunk_size)
                tasks.append(_Task(role, ref.sha256, base + off, length, h, i))
        else:
            tasks.append(_Task(role, ref.sha256, base, ref.size, ref.sha256, None))
    return tasks


def ranges(manifest: Manifest, data_offsets: dict[str, int]) -> list[tuple[int, int]]:
    """(offset in the bundle, length) of every range ``verify_in_place`` hashes."""
    return [(t.offset, t.length) for t in _tasks(manifest, data_offsets)]


def _check(fd: int, task: _Task, known: str | None = None) -> None:
    if known is not None:
        _compare(task, known)
        return
    digest = hashlib.sha256()
    pos, end = task.offset, task.offset + task.length
    while pos < end:
        block = os.pread(fd, min(READ, end - pos), pos)
        if not block:
            where = "" if task.chunk is None else f" chunk {task.chunk}"
            raise LengthMismatchError(
                f"file {task.role!r} ({task.sha256[:12]}…){where} ended after "
                f"{pos - task.offset} of {task.length} bytes: the bundle is truncated"
            )
        digest.update(block)
        pos += len(block)
    _compare(task, digest.hexdigest())


def _compare(task: _Task, got: str) -> None:
    if got != task.expected:
        where = "" if task.chunk is None else f" chunk {task.chunk}"
        raise HashMismatchError(
            f"file hash {got[:12]}… of {task.role!r} ({task.sha256[:12]}…){where} does not match "
            f"the manifest's {task.expected[:12]}…"
        )


def verify_in_place(path: Path, manifest: Manifest, data_offsets: dict[str, int],
                    workers: int | None = None,
                    known: Mapping[tuple[int, int], str] | None = None) -> int:
    """Check every blob of ``manifest`` at ``data_offsets[sha256]`` in ``path``; return bytes checked.

    ``workers``: threads (default: the CPUs this process may use). Raises on the first failure
    in manifest order, so the error is the same whatever the number of workers. ``known``:
    sha256 hex of byte ranges ``(offset, length)`` of ``path`` already read; a task whose range
    is there is compared without reading it again.
    """
    tasks = _tasks(manifest, data_offsets)
    known = known or {}
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        to_read = [t for t in tasks if (t.offset, t.length) not in known]
        if workers <= 1 or len(to_read) <= 1:
            for task in tasks:
                _check(fd, task, known.get((task.offset, task.length)))
        else:
            from concurrent.futures import ThreadPoolExecutor  # not needed when all is known

            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                futures = {t: pool.submit(_check, fd, t) for t in to_read}
                for task in tasks:  # in manifest order, known or read
                    if task in futures:
                        futures[task].result()
                    else:
                        _compare(task, known[(task.offset, task.length)])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        os.close(fd)
    return sum(ref.size for ref in manifest.files.values())


def copy_chunks_verified(path: Path, offset: int, role: str, ref: FileRef, dest: BinaryIO) -> None:
    """Copy a chunked blob from ``path`` at ``offset`` into ``dest`` and prove its identity:
    the SHA-256 of the very bytes written, whole, equals ``ref.sha256``; raise naming the file
    (and, on a mismatch, the first chunk of the bundle that differs from its signed hash).

    The main thread reads a chunk (``os.pread``) and writes it; a worker thread hashes it
    meanwhile (hashlib and the I/O release the GIL): one pass of SHA-256 over the blob, the
    one that names it in the content-addressed store, so the placed file needs no second
    (``BlobsPlaced.proven``). A short read (truncated bundle) is refused with the chunk.
    """
    assert ref.chunks is not None and ref.chunk_size is not None
    import queue
    import threading

    digest = hashlib.sha256()
    blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=4)  # bounded memory

    def hash_blocks() -> None:
        while (block := blocks.get()) is not None:
            digest.update(block)

    worker = threading.Thread(target=hash_blocks, name="blob-hash", daemon=True)
    worker.start()
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            for i in range(len(ref.chunks)):
                off, length = chunk_span(i, ref.size, ref.chunk_size)
                data = os.pread(fd, length, offset + off)
                if len(data) != length:
                    raise LengthMismatchError(
                        f"file {role!r} ({ref.sha256[:12]}…) chunk {i} ended after {len(data)} of "
                        f"{length} bytes: the bundle is truncated"
                    )
                dest.write(data)
                blocks.put(data)
        finally:
            blocks.put(None)
            worker.join()
        got = digest.hexdigest()
        if got != ref.sha256:
            raise HashMismatchError(
                f"file hash {got[:12]}… of {role!r} ({ref.sha256[:12]}…){_first_bad_chunk(fd, offset, ref)} "
                f"does not match the manifest's {ref.sha256[:12]}…"
            )
    finally:
        os.close(fd)


def _first_bad_chunk(fd: int, offset: int, ref: FileRef) -> str:
    """For the refusal only: " chunk N" of the first chunk whose bytes in the bundle (read
    again) differ from the signed chunk hash, or "" when every chunk matches."""
    assert ref.chunks is not None and ref.chunk_size is not None
    for i, expected in enumerate(ref.chunks):
        off, length = chunk_span(i, ref.size, ref.chunk_size)
        if hashlib.sha256(os.pread(fd, length, offset + off)).hexdigest() != expected:
            return f" chunk {i}"
    return ""
