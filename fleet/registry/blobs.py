"""Content-addressed blob files under ``data_dir/blobs/sha256/<hex>``.

A blob is written to a temp file beside its final place and renamed when the writer
closes without error; callers check the hash inside the ``with`` block (as
``shared.bundle.archive.copy_verified`` does), so a reader never sees a partial or wrong
file under a digest name.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
RANGE_SPEC_RE = re.compile(r"([0-9]{0,19})\s*-\s*([0-9]{0,19})")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "blobs" / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex SHA-256")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextmanager
    def writer(self, sha256: str, size: int) -> Iterator[BinaryIO]:
        """A temp file for ``sha256``, renamed into place when the block ends without error."""
        final = self.path(sha256)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha256[:16]}.", dir=self.root)
        path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(path, final)
        finally:
            path.unlink(missing_ok=True)


class RangeError(ValueError):
    """A Range header the blob cannot satisfy (answered 416 with the blob's size)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` a ``Range`` header asks of a ``size``-byte blob.

    None means "send it all": no header, or several ranges (RFC 9110 lets a server ignore
    those; the agent asks for one). RangeError when it is malformed or beyond the end."""
    header = header.strip()
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise RangeError(f"Range {header[:80]!r}: only 'bytes=FIRST-[LAST]' or 'bytes=-SUFFIX' is served")
    if "," in spec:
        return None
    match = RANGE_SPEC_RE.fullmatch(spec.strip())
    if match is None or not (match[1] or match[2]):
        raise RangeError(f"Range {header[:80]!r}: use 'bytes=FIRST-[LAST]' or 'bytes=-SUFFIX'")
    first_text, last_text = match[1], match[2]
    if not first_text:  # suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeError(f"Range {header[:80]!r} selects no byte of the {size}-byte blob")
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        raise RangeError(f"Range {header[:80]!r}: the last byte comes before the first")
    if first >= size:
        raise RangeError(f"Range {header[:80]!r} starts at or past the end of the {size}-byte blob")
    return first, min(last, size - 1)


def read_range(path: Path, first: int, last: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes ``first..last`` (inclusive) of ``path``, in chunks."""
    remaining = last - first + 1
    with open(path, "rb") as fh:
        fh.seek(first)
        while remaining > 0:
            block = fh.read(min(chunk, remaining))
            if not block:
                raise OSError(f"{path} ended {remaining} bytes early")
            remaining -= len(block)
            yield block
