"""Content-addressed blob store and verified envelopes in state_dir.

    blobs/sha256/<hex>                         a file whose hash was verified before it was placed
    staging/<hex>.part                         a partial download (kept across restarts and
                                               resumed with HTTP Range) or extraction
    releases/<model>/<release>-<digest12>.dsse.json   a verified manifest envelope

A blob is written to staging, hash-checked while it streams, fsynced and renamed into
place; a file under blobs/ is therefore always complete and verified.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from agent.errors import DiskFullError
from shared.bundle.manifest import NAME_RE, SHA256_RE, FileRef
from shared.fsutil import atomic_write

if TYPE_CHECKING:  # imported where files are hashed: not with the agent (shared.digest)
    import hashlib

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(exc: OSError, what: str) -> DiskFullError:
    return DiskFullError(f"no space left in state_dir while writing {what}: {exc.strerror}")


def _writeback_starter() -> Callable[[int, int, int], object] | None:
    """Linux ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing a
    range to disk without waiting (Python's os module lacks it); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)


class BlobWriter:
    """Appends a download to its staging file and hashes it, both on a worker thread.

    The network thread only collects bytes into blocks; SHA-256 and ``write`` release the GIL,
    so on a two-core device they overlap the transfer instead of following it. Every
    ``WRITEBACK`` bytes the worker asks the kernel to start writing them out, so that the fsync
    of ``BlobStore.commit`` (the crash-safety point, unchanged) finds little left to do. The
    digest covers exactly the bytes written, in order; it is complete after ``close``. A block
    is handed over at ``BLOCK`` bytes or ``HANDOFF_S`` after the previous one, so on a slow link
    the partial on disk still follows the transfer closely. At most ``DEPTH`` blocks wait for
    the worker (bounded memory). An error of the worker (a full disk)
    is raised by the next ``write`` or by ``close``. ``close`` writes what was received, so a
    cut transfer keeps its partial for the next resume.
    """

    BLOCK = 1 << 20
    HANDOFF_S = 0.1
    WRITEBACK = 4 << 20
    DEPTH = 4

    def __init__(self, dest: BinaryIO, digest: hashlib._Hash) -> None:
        self.dest = dest
        self.digest = digest
        self.error: BaseException | None = None
        self._buf = bytearray()
        self._handed = time.monotonic()
        self._queue: queue.Queue[bytearray | None] = queue.Queue(maxsize=self.DEPTH)
        self._writeback = _writeback_starter()
        self._worker = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._worker.start()

    def _run(self) -> None:
        fd, pending, failed = self.dest.fileno(), 0, False
        while (block := self._queue.get()) is not None:
            if failed:
                continue  # drain, so the network thread never blocks on a dead worker
            try:
                self.dest.write(block)
                self.dest.flush()
                self.digest.update(block)
                pending += len(block)
                if self._writeback is not None and pending >= self.WRITEBACK:
                    self._writeback(fd, self.dest.tell() - pending, pending)
                    pending = 0
            except BaseException as exc:  # handed to the network thread
                self.error, failed = exc, True

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self._buf += data
        if len(self._buf) >= self.BLOCK or time.monotonic() - self._handed >= self.HANDOFF_S:
            self._queue.put(self._buf)
            self._buf = bytearray()
            self._handed = time.monotonic()

    def close(self) -> None:
        """Hand over the rest and wait for the worker; raise its error, if any."""
        if self._worker.is_alive():
            if self._buf:
                self._queue.put(self._buf)
                self._buf = bytearray()
            self._queue.put(None)
            self._worker.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:  # the transfer's own error is the one to report
            log.warning("blob writer: %s (while stopping after %s)", err, exc)


class BlobStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.blob_dir = self.state_dir / "blobs" / "sha256"
        self.staging_dir = self.state_dir / "staging"
        self.releases_dir = self.state_dir / "releases"

    def ensure_dirs(self) -> None:
        for d in (self.blob_dir, self.staging_dir, self.releases_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- blobs ----------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return self.blob_dir / sha256

    def has(self, ref: FileRef) -> bool:
        """A placed blob was verified on placement; its size guards against outside damage."""
        try:
            return self.path(ref.sha256).stat().st_size == ref.size
        except FileNotFoundError:
            return False

    def missing(self, refs: Iterable[FileRef]) -> list[FileRef]:
        return [ref for ref in refs if not self.has(ref)]

    def staging_path(self, sha256: str) -> Path:
        self.path(sha256)  # validates the name
        return self.staging_dir / f"{sha256}.part"

    def open_staging(self, sha256: str, size: int = 0) -> BinaryIO:
        """A file to write a blob into; call ``commit(sha256)`` once its hash was checked."""
        self.ensure_dirs()
        try:
            return open(self.staging_path(sha256), "wb")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full(exc, f"blob {sha256[:12]}") from None
            raise

    def partial_size(self, sha256: str) -> int:
        """Bytes of a partial download kept in staging (0 when there is none); for the sparse
        partial of a chunked download, the bytes it occupies rather than its length."""
        try:
            st = self.staging_path(sha256).stat()
        except FileNotFoundError:
            return 0
        return min(st.st_size, st.st_blocks * 512) if st.st_blocks else st.st_size

    def resume_partial(self, sha256: str) -> tuple[int, hashlib._Hash]:
        """Offset and SHA-256 state of a kept partial, recomputed from the bytes on disk.

        Nothing about a partial is trusted but its bytes: after a power cut its tail may
        be missing, so the hash is always taken from what the file holds now.
        """
        import hashlib

        digest = hashlib.sha256()
        try:
            with open(self.staging_path(sha256), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                return fh.tell(), digest
        except FileNotFoundError:
            return 0, digest

    def open_partial(self, sha256: str, *, append: bool) -> BinaryIO:
        """The staging file of a download: appended to when resuming, else truncated."""
        self.ensure_dirs()
        try:
            return open(self.staging_path(sha256), "ab" if append else "wb")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full(exc, f"blob {sha256[:12]}") from None
            raise

    def free_bytes(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        import shutil  # here, not with the agent (with bz2, lzma: ~1.5 ms of a start)

        return shutil.disk_usage(self.state_dir).free

    def verify_placed(self, ref: FileRef) -> bool:
        """Re-hash a placed blob; a damaged one is removed so that it is fetched again."""
        import hashlib

        path = self.path(ref.sha256)
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                size = fh.tell()
        except FileNotFoundError:
            return False
        if size == ref.size and digest.hexdigest() == ref.sha256:
            return True
        path.unlink(missing_ok=True)
        return False

    def commit(self, sha256: str) -> None:
        """fsync the verified staging file and rename it into place."""
        part = self.staging_path(sha256)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, self.path(sha256))
        _fsync_dir(self.blob_dir)

    def discard(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.staging_path(sha256).unlink()

    # -- envelopes --------------------------------------------------------------------

    def envelope_path(self, model: str, release: int, digest: str) -> Path:
        if not NAME_RE.match(model) or not SHA256_RE.match(digest):
            raise ValueError(f"bad model name {model!r} or digest {digest!r}")
        return self.releases_dir / model / f"{release}-{digest[:12]}.dsse.json"

    def save_envelope(self, model: str, release: int, digest: str, envelope: bytes) -> None:
        path = self.envelope_path(model, release, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, envelope)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise disk_full(exc, "an envelope") from None
            raise

    def load_envelope(self, model: str, release: int, digest: str) -> bytes | None:
        try:
            return self.envelope_path(model, release, digest).read_bytes()
        except FileNotFoundError:
            return None

    # -- garbage collection -----------------------------------------------------------

    def gc(self, keep_blobs: set[str], keep_envelopes: set[Path]) -> list[str]:
        """Remove blobs and envelopes nobody references, and stale staging files."""
        removed = []
        if self.blob_dir.is_dir():
            for p in self.blob_dir.iterdir():
                if p.name not in keep_blobs:
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                if p.name.removesuffix(".part") not in keep_blobs:
                    p.unlink(missing_ok=True)
        if self.releases_dir.is_dir():
            for p in self.releases_dir.glob("*/*.dsse.json"):
                if p not in keep_envelopes:
                    p.unlink(missing_ok=True)
        return removed
