"""Chunked downloads: reuse the chunks the device holds, fetch only the missing ones by Range.

For a file whose manifest entry lists chunks (shared/bundle/chunks.py):

1. the staging file ``staging/<sha256>.part`` is opened without truncation and every chunk
   it holds is re-hashed; those that match are kept (resume at chunk granularity: nothing
   about a partial is trusted but its bytes, so no progress file can lie after a power cut);
2. each missing chunk that the ChunkIndex knows (a chunk of a placed blob of any release
   whose envelope is stored on the device) is read from that blob, hashed, and written at
   its offset; a chunk repeated inside the file is fetched once and copied;
3. the rest are fetched with ``Range: bytes=FIRST-LAST``, one request per run of consecutive
   missing chunks (split so that ``policy.parallel`` requests share a full download, at most
   MAX_SPAN_CHUNKS chunks each), on the fetcher's one httpx client. The first request is the
   probe: the others start once it was answered; a server that answers 200 ignores Range,
   and the download falls back to the whole file, keeping the verified prefix of the
   partial. Each chunk is hashed as its bytes pass and marked done at its last byte, so a
   cut request resumes at the first chunk it had not finished; a wrong hash is fetched
   again once, a second wrong hash is a HashMismatchError (reason ``hash``);
4. the assembled file is hashed whole against the manifest's sha256, fsynced and renamed
   into blobs/ (BlobStore.commit). The whole-file hash advances in file order while the
   chunks arrive (each chunk is read back once all chunks before it are verified), so on a
   device with two cores it overlaps the network instead of adding a pass at the end.

A byte of the staging file is used only after its chunk's hash matched, and the file reaches
blobs/ only after the whole-file hash matched: nothing unverified reaches the active slot.
Retries, backoff, stall detection, the rate limit and the update window are the Fetcher's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import msgspec

from agent.update.blobs import BlobStore, disk_full
from agent.update.fetch import CONTENT_RANGE_RE, Cancelled, Fetcher, RateMeter, Retryable
from shared.bundle.chunks import chunk_span
from shared.bundle.envelope import Envelope
from shared.bundle.manifest import FileRef, parse_manifest
from shared.errors import EdgefleetError, HashMismatchError, LengthMismatchError

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 20
MAX_SPAN_CHUNKS = 32  # chunks per Range request at most


class ChunkSource(msgspec.Struct, frozen=True):
    """Where a chunk's bytes are on the device: a placed blob and a span of it."""

    blob: str
    offset: int
    length: int


class ChunkIndex:
    """chunk sha256 -> ChunkSource, over the placed blobs of every release stored on the device.

    Rebuilt from the stored envelopes at each download (a few small JSON files: cheap, and
    never stale after a garbage collection). The envelopes were verified when stored, but the
    index trusts nothing: every chunk read through it is hashed again before it is used.
    """

    def __init__(self, entries: dict[str, ChunkSource] | None = None) -> None:
        self.entries = entries or {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, chunk_sha: str) -> ChunkSource | None:
        return self.entries.get(chunk_sha)

    @classmethod
    def build(cls, blobs: BlobStore) -> ChunkIndex:
        entries: dict[str, ChunkSource] = {}
        if not blobs.releases_dir.is_dir():
            return cls(entries)
        for path in sorted(blobs.releases_dir.glob("*/*.dsse.json")):
            try:
                manifest = parse_manifest(Envelope.from_json(path.read_bytes()).payload)
            except (OSError, EdgefleetError, ValueError) as exc:
                log.debug("chunk index: skipping %s: %s", path, exc)
                continue
            for ref in manifest.files.values():
                if ref.chunks is None or ref.chunk_size is None or not blobs.has(ref):
                    continue
                for i, h in enumerate(ref.chunks):
                    offset, length = chunk_span(i, ref.size, ref.chunk_size)
                    entries.setdefault(h, ChunkSource(ref.sha256, offset, length))
        return cls(entries)


class RangeUnsupported(Exception):
    """The server answered a chunk request with the whole file (200) or a range that does not fit."""


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class ChunkedDownload:
    """One file, fetched chunk by chunk into its staging file (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, url: str, ref: FileRef, blobs: BlobStore,
                 index: ChunkIndex) -> None:
        if ref.chunks is None or ref.chunk_size is None:
            raise ValueError(f"blob {ref.sha256[:12]}… lists no chunks")
        self.fetcher = fetcher
        self.url = url
        self.ref = ref
        self.chunks: list[str] = ref.chunks
        self.chunk_size: int = ref.chunk_size
        self.blobs = blobs
        self.index = index
        self.what = f"blob {ref.sha256[:12]}…"
        self.done: set[int] = set()
        self.stop = threading.Event()  # set when one chunk failed: the others give up
        self._lock = threading.Lock()
        self._whole = hashlib.sha256()  # of chunks [0, _frontier), read back after verification
        self._frontier = 0
        self._frontier_lock = threading.Lock()
        self._fd = -1
        self._probed = threading.Event()  # the first Range request was answered (or failed)

    def span(self, i: int) -> tuple[int, int]:
        return chunk_span(i, self.ref.size, self.chunk_size)

    # -- the steps ------------------------------------------------------------------

    def run(self) -> None:
        """Assemble, verify and place the file; raise like Fetcher.fetch_blob."""
        self.blobs.ensure_dirs()
        try:
            fd = os.open(self.blobs.staging_path(self.ref.sha256), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full(exc, self.what) from None
            raise
        self._fd = fd
        try:
            self._resume(fd)
            self._reuse(fd)
            self._copy_duplicates(fd)
            todo = self._missing_unique()
            if todo:
                try:
                    self._fetch_remote(fd, todo)
                except RangeUnsupported as exc:
                    self._fall_back(fd, exc)
                    return
                self._copy_duplicates(fd)
            self._place(fd)
        except (LengthMismatchError, HashMismatchError):
            self.blobs.discard(self.ref.sha256)
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.blobs.discard(self.ref.sha256)
                raise disk_full(exc, self.what) from None
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _resume(self, fd: int) -> None:
        """Keep the chunks a kept partial holds whose hash matches (re-hashed, never trusted)."""
        size = os.fstat(fd).st_size
        if size > self.ref.size:
            os.ftruncate(fd, self.ref.size)
            size = self.ref.size
        if size == 0:
            return
        kept = 0
        for i, h in enumerate(self.chunks):
            offset, length = self.span(i)
            if offset + length > size:
                break
            if hashlib.sha256(_pread_exact(fd, length, offset)).hexdigest() == h:
                self._mark_done(i)
                kept += length
        self.fetcher.stats.add(resumed=kept)
        if kept:
            log.info("%s: %d of %d chunks kept from the partial", self.what, len(self.done), len(self.chunks))

    def _reuse(self, fd: int) -> None:
        """Copy chunks the device holds in placed blobs of other releases, each hashed first."""
        reused = 0
        open_blobs: dict[str, int] = {}
        try:
            for i, h in enumerate(self.chunks):
                if i in self.done or (src := self.index.get(h)) is None:
                    continue
                src_fd = open_blobs.get(src.blob)
                if src_fd is None:
                    try:
                        src_fd = open_blobs[src.blob] = os.open(self.blobs.path(src.blob), os.O_RDONLY)
                    except OSError:
                        continue
                data = _pread_exact(src_fd, src.length, src.offset)
                if hashlib.sha256(data).hexdigest() != h:
                    log.warning("%s: chunk %d in local blob %s… does not hash right; fetching it",
                                self.what, i, src.blob[:12])
                    continue
                _pwrite_all(fd, data, self.span(i)[0])
                self._mark_done(i)
                reused += len(data)
        finally:
            for src_fd in open_blobs.values():
                os.close(src_fd)
        self.fetcher.stats.add(reused=reused)

    def _mark_done(self, i: int) -> None:
        with self._lock:
            self.done.add(i)
        self._advance()

    def _advance(self) -> None:
        """Feed the whole-file hash with the verified chunks at its frontier, in file order.

        One thread at a time advances; a thread that finds another one at it leaves, and the
        advancing thread looks again after letting go, so no verified chunk is left behind.
        """
        while self._frontier_lock.acquire(blocking=False):
            try:
                while self._ready():
                    offset, length = self.span(self._frontier)
                    self._whole.update(_pread_exact(self._fd, length, offset))
                    self._frontier += 1
            finally:
                self._frontier_lock.release()
            if not self._ready():
                return

    def _ready(self) -> bool:
        with self._lock:
            return self._frontier < len(self.chunks) and self._frontier in self.done

    def _copy_duplicates(self, fd: int) -> None:
        """A chunk repeated inside the file (zero-filled tensors) is copied from a verified copy."""
        by_hash = {self.chunks[i]: i for i in self.done}
        for i, h in enumerate(self.chunks):
            if i in self.done or h not in by_hash:
                continue
            offset, length = self.span(by_hash[h])
            data = _pread_exact(fd, length, offset)
            if hashlib.sha256(data).hexdigest() == h:
                _pwrite_all(fd, data, self.span(i)[0])
                self._mark_done(i)

    def _missing_unique(self) -> list[int]:
        seen: set[str] = set()
        out = []
        for i, h in enumerate(self.chunks):
            if i not in self.done and h not in seen:
                seen.add(h)
                out.append(i)
        return out

    def spans(self, todo: list[int]) -> list[tuple[int, int]]:
        """Runs of consecutive chunks to fetch, one Range request each, split so that
        ``parallel`` requests share the work (at most MAX_SPAN_CHUNKS chunks per request)."""
        per = max(1, min(MAX_SPAN_CHUNKS, -(-len(todo) // max(1, self.fetcher.policy.parallel))))
        out: list[tuple[int, int]] = []
        for i in todo:
            if out and out[-1][1] == i - 1 and out[-1][1] - out[-1][0] + 1 < per:
                out[-1] = (out[-1][0], i)
            else:
                out.append((i, i))
        return out

    def _fetch_remote(self, fd: int, todo: list[int]) -> None:
        """Every span on a pool of ``policy.parallel`` threads. The first span is the probe: the
        others start once its response was checked (a server that ignores Range is found with
        one wasted response, not ``parallel``)."""
        spans = self.spans(todo)
        workers = max(1, min(self.fetcher.policy.parallel, len(spans)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk") as pool:
            futures = [pool.submit(self._fetch_span, fd, first, last, probe=n == 0)
                       for n, (first, last) in enumerate(spans)]
            finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in finished):
                self.stop.set()
                self._probed.set()
                for f in pending:
                    f.cancel()
                wait(pending)
                errors = [f.exception() for f in futures if f.done() and not f.cancelled()
                          and f.exception() is not None]
                # The first failure that is not another span giving up because of it.
                primary = next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
                assert primary is not None
                raise primary

    def _fetch_span(self, fd: int, first: int, last: int, *, probe: bool) -> None:
        mismatches: dict[int, int] = {}
        try:
            if not probe:
                self._probed.wait()
            self.fetcher._retrying(f"{self.what} chunks {first}-{last} from {self.url}",
                                   lambda: self._span_once(fd, first, last, mismatches, probe))
        except BaseException:
            if probe:  # e.g. Range ignored: the other requests must not start at all
                self.stop.set()
            raise
        finally:
            if probe:
                self._probed.set()

    def _span_once(self, fd: int, first: int, last: int, mismatches: dict[int, int], probe: bool) -> None:
        """Stream the chunks of [first, last] not yet done (one request from the first of them to
        the last), each hashed as it passes and marked done when it matches."""
        f = self.fetcher
        if self.stop.is_set():
            raise _Stopped(f"{self.what}: another request failed")
        with self._lock:
            pending = [i for i in range(first, last + 1) if i not in self.done]
        if not pending:
            return
        f.check_window(self.what)
        start = self.span(pending[0])[0]
        end_off, end_len = self.span(pending[-1])
        stop_at = end_off + end_len - 1
        rng = f"bytes={start}-{stop_at}"
        with f.client.stream("GET", self.url, headers=f._headers({"Range": rng}),
                             timeout=f.policy.timeout()) as response:
            if response.status_code in (200, 416):
                raise RangeUnsupported(f"GET {self.url} answered HTTP {response.status_code} to Range {rng}")
            f._check(response, self.url, ok=(206,))
            value = response.headers.get("content-range", "").strip()
            m = CONTENT_RANGE_RE.match(value)
            # A server may send more than asked (e.g. to the end of the file): only the bytes
            # up to ``stop_at`` are read.
            if (m is None or int(m.group(1)) != start or int(m.group(2)) < stop_at
                    or (m.group(3) != "*" and int(m.group(3)) != self.ref.size)):
                raise RangeUnsupported(f"GET {self.url}: 206 with Content-Range {value!r} to Range {rng} "
                                       f"of a {self.ref.size}-byte file")
            if probe:
                self._probed.set()
            meter = RateMeter(f.policy, f.clock)
            i = pending[0]
            offset, length = self.span(i)
            pos, digest = start, hashlib.sha256()
            bad: list[int] = []
            for data in response.iter_raw():
                view = memoryview(data)
                while view and i <= pending[-1]:
                    take = view[: offset + length - pos]
                    _pwrite_all(fd, take, pos)
                    digest.update(take)
                    pos += len(take)
                    view = view[len(take):]
                    if pos == offset + length:  # a chunk boundary: judge the chunk
                        if digest.hexdigest() == self.chunks[i]:
                            self._mark_done(i)
                        else:
                            bad.append(i)
                        i += 1
                        if i <= pending[-1]:
                            offset, length = self.span(i)
                            digest = hashlib.sha256()
                f.stats.add(network=len(data) - len(view))
                f.throttle(len(data) - len(view), meter)
                meter.add(len(data) - len(view), f"{self.what} {rng}")
                if f.cancel.is_set():
                    raise Cancelled(f"{self.what}: the agent is stopping (partial kept)")
                if self.stop.is_set():
                    raise _Stopped(f"{self.what}: another request failed")
                if i > pending[-1]:
                    break
            if pos <= stop_at and not bad:
                raise Retryable(f"{self.what}: {rng} ended {stop_at + 1 - pos} bytes short")
        for i in bad:
            mismatches[i] = mismatches.get(i, 0) + 1
            if mismatches[i] >= 2:
                raise HashMismatchError(
                    f"{self.what}: chunk {i} hashed wrong twice, the manifest says {self.chunks[i][:12]}…"
                )
        if bad:
            raise Retryable(f"{self.what}: chunk(s) {bad} did not hash right; fetching them again")
        if pos <= stop_at:
            raise Retryable(f"{self.what}: {rng} ended {stop_at + 1 - pos} bytes short")

    def _fall_back(self, fd: int, exc: RangeUnsupported) -> None:
        """Whole-file download, resuming from the verified prefix of the partial."""
        prefix = 0
        for i in range(len(self.chunks)):
            if i not in self.done:
                break
            prefix += self.span(i)[1]
        os.ftruncate(fd, prefix)
        os.fsync(fd)
        self.fetcher.stats.add(fallbacks=1)
        log.warning("%s: %s; downloading the whole file (from byte %d)", self.what, exc, prefix)
        self.fetcher.fetch_blob(self.url, self.ref, self.blobs)

    def _place(self, fd: int) -> None:
        missing = len(self.chunks) - len(self.done)
        if missing:  # cannot happen: every chunk was kept, reused, copied or fetched
            raise Retryable(f"{self.what}: {missing} chunk(s) still missing")
        os.ftruncate(fd, self.ref.size)
        self._advance()
        whole = self._whole
        if self._frontier != len(self.chunks):  # cannot happen: every chunk is done
            whole = hashlib.sha256()
            for offset in range(0, self.ref.size, READ_BLOCK):
                whole.update(_pread_exact(fd, min(READ_BLOCK, self.ref.size - offset), offset))
        if whole.hexdigest() != self.ref.sha256:
            raise HashMismatchError(
                f"{self.what}: the assembled file hashes {whole.hexdigest()[:12]}… although every "
                "chunk matched (chunk list and file hash of the manifest disagree)"
            )
        self.blobs.commit(self.ref.sha256)


class _Stopped(Cancelled):
    """A chunk that gave up because another one failed (never the reason reported)."""


def fetch_chunked(fetcher: Fetcher, url: str, ref: FileRef, blobs: BlobStore, index: ChunkIndex) -> None:
    ChunkedDownload(fetcher, url, ref, blobs, index).run()
