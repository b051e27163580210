"""shared.bundle.parallel_verify: every chunk checked, on any number of threads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.bundle.chunks import hash_chunks
from shared.bundle.parallel_verify import copy_chunks_verified, verify_in_place
from shared.errors import HashMismatchError, LengthMismatchError

CHUNK = 64 * 1024
HEADER = 512  # the blobs sit after some bytes, as tar members do


def _bundle(tmp_path: Path, chunked: bool = True) -> tuple[Path, SimpleNamespace, dict[str, int]]:
    data = os.urandom(CHUNK * 9 + 1234)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    sha, chunks = hash_chunks(blob, CHUNK)
    small = b"vectors" * 100
    small_sha = hashlib.sha256(small).hexdigest()
    path = tmp_path / "b.bundle"
    path.write_bytes(b"\0" * HEADER + data + small)
    files = {
        "model": SimpleNamespace(sha256=sha, size=len(data), chunk_size=CHUNK if chunked else None,
                                 chunks=chunks if chunked else None),
        "vectors": SimpleNamespace(sha256=small_sha, size=len(small), chunk_size=None, chunks=None),
    }
    return path, SimpleNamespace(files=files), {sha: HEADER, small_sha: HEADER + len(data)}


@pytest.mark.parametrize("workers", [1, 2, 8])
@pytest.mark.parametrize("chunked", [True, False])
def test_good_bundle_verifies(tmp_path: Path, workers: int, chunked: bool) -> None:
    path, manifest, offsets = _bundle(tmp_path, chunked)
    assert verify_in_place(path, manifest, offsets, workers=workers) == CHUNK * 9 + 1234 + 700


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupted_chunk_in_the_middle_is_refused(tmp_path: Path, workers: int) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER + CHUNK * 4 + 17] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError, match=r"file hash .* of 'model' .* chunk 4 does not match"):
        verify_in_place(path, manifest, offsets, workers=workers)


def test_corrupted_unchunked_file_is_refused(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(HashMismatchError, match=r"of 'vectors'"):
        verify_in_place(path, manifest, offsets, workers=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_bundle_is_refused(tmp_path: Path, workers: int) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(HEADER + CHUNK * 6 + 5)
    with pytest.raises(LengthMismatchError, match=r"'model' .* chunk 6 ended after 5 of 65536 bytes"):
        verify_in_place(path, manifest, offsets, workers=workers)


def test_copy_chunks_verified_copies_the_blob(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    ref = manifest.files["model"]
    out = tmp_path / "out"
    with open(out, "wb") as dest:
        copy_chunks_verified(path, offsets[ref.sha256], "model", ref, dest)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == ref.sha256


def test_copy_chunks_verified_refuses_a_corrupted_middle_chunk(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[HEADER + CHUNK * 5 + 1] ^= 0x01
    path.write_bytes(bytes(raw))
    ref = manifest.files["model"]
    with open(tmp_path / "out", "wb") as dest, pytest.raises(HashMismatchError, match=r"'model' .* chunk 5"):
        copy_chunks_verified(path, offsets[ref.sha256], "model", ref, dest)


def test_copy_chunks_verified_refuses_a_truncated_bundle(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(HEADER + CHUNK * 3)
    ref = manifest.files["model"]
    with open(tmp_path / "out", "wb") as dest, \
            pytest.raises(LengthMismatchError, match=r"chunk 3 ended after 0"):
        copy_chunks_verified(path, offsets[ref.sha256], "model", ref, dest)


def test_copy_chunks_verified_proves_the_whole_file_not_only_its_chunks(tmp_path: Path) -> None:
    """The placed blob is named by its whole-file sha256: a manifest whose chunk hashes match
    bytes that are not the named file (a signer's inconsistent entry) is refused, so the
    update machine may skip re-hashing what was proven here."""
    path, manifest, offsets = _bundle(tmp_path)
    ref = manifest.files["model"]
    other = SimpleNamespace(sha256="0" * 64, size=ref.size, chunk_size=ref.chunk_size, chunks=ref.chunks)
    with open(tmp_path / "out", "wb") as dest, \
            pytest.raises(HashMismatchError, match=r"of 'model' \(000000000000…\) does not match"):
        copy_chunks_verified(path, offsets[ref.sha256], "model", other, dest)  # type: ignore[arg-type]
