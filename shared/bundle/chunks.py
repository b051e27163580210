"""Fixed-size chunks of a bundle file: the unit a device reuses and fetches with HTTP Range.

A file may carry ``chunk_size`` and ``chunks`` in its manifest entry: chunk *i* is the bytes
``[i * chunk_size, min(size, (i + 1) * chunk_size))`` and ``chunks[i]`` their SHA-256. The
whole-file ``sha256`` stays the file's identity; chunks are only a download optimisation
(single-file bundles and offline installs carry whole blobs).

Rules (checked by ``validate_chunks``, called from ``Manifest.validate``):
- ``chunk_size`` and ``chunks`` come together or not at all;
- ``chunk_size`` is a power of two in [MIN_CHUNK_SIZE, MAX_CHUNK_SIZE];
- ``len(chunks) == ceil(size / chunk_size)`` and at most MAX_CHUNKS;
- each chunk hash is 64 lowercase hex.

Why fixed-size rather than content-defined: docs/bundles.md ("Chunks") has the figures.
"""

from __future__ import annotations

import os

from shared.errors import MalformedDocumentError

TYPE_CHECKING = False  # not typing's: shared.bundle.speculative imports this module first thing
if TYPE_CHECKING:
    import re

MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
# 2048 hashes are ~137 KB of manifest JSON, inside MAX_MANIFEST_BYTES (256 KiB).
MAX_CHUNKS = 2048
# The builder doubles the chunk size until a file has at most this many chunks, so that a
# 16 GiB file (MAX_FILE_BYTES) still fits with 16 MiB chunks.
TARGET_MAX_CHUNKS = 1024
# Files smaller than this are not chunked by default: the whole file is a few requests'
# worth, and reuse would save little.
DEFAULT_MIN_CHUNKED_FILE = 8 * 1024 * 1024
_SHA256_RE: re.Pattern[str] | None = None  # compiled on first use (re costs ~3 ms to import)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a file of ``size`` bytes."""
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


def validate_chunks(role: str, size: int, chunk_size: int | None, chunks: list[str] | None) -> None:
    """Raise MalformedDocumentError naming the file, the value and the bound."""
    if chunk_size is None and chunks is None:
        return
    if chunk_size is None or chunks is None:
        raise MalformedDocumentError(f"file {role!r}: chunk_size and chunks must be given together")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise MalformedDocumentError(
            f"file {role!r}: chunk_size {chunk_size} must be a power of two in "
            f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    want = chunk_count(size, chunk_size)
    if len(chunks) != want:
        raise MalformedDocumentError(
            f"file {role!r}: {len(chunks)} chunk hashes, a size of {size} in chunks of {chunk_size} "
            f"needs {want}"
        )
    if want > MAX_CHUNKS:
        raise MalformedDocumentError(f"file {role!r}: {want} chunks, at most {MAX_CHUNKS}")
    global _SHA256_RE
    if _SHA256_RE is None:
        import re

        _SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
    for i, h in enumerate(chunks):
        if not isinstance(h, str) or not _SHA256_RE.match(h):
            raise MalformedDocumentError(f"file {role!r}: chunk {i} hash is not 64 lowercase hex")


def choose_chunk_size(size: int, preferred: int = DEFAULT_CHUNK_SIZE) -> int:
    """``preferred``, doubled until the file has at most TARGET_MAX_CHUNKS chunks."""
    chunk_size = preferred
    while chunk_count(size, chunk_size) > TARGET_MAX_CHUNKS and chunk_size < MAX_CHUNK_SIZE:
        chunk_size *= 2
    return chunk_size


def hash_chunks(path: str | os.PathLike[str], chunk_size: int) -> tuple[str, list[str]]:
    """The whole-file SHA-256 and the SHA-256 of each chunk, in one read of the file."""
    import hashlib  # OpenSSL's, for files; not loaded with the agent (shared.digest)

    whole = hashlib.sha256()
    chunks = []
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
    return whole.hexdigest(), chunks
