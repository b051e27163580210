"""shared.bundle.speculative: blobs hashed before the envelope is verified, used only where
the vetted layout matches, so that a tampered, re-chunked or truncated bundle is judged
exactly as without it."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.bundle import speculative
from shared.bundle.archive import BLOB_PREFIX, write_bundle
from shared.bundle.chunks import DEFAULT_MIN_CHUNKED_FILE, choose_chunk_size, hash_chunks
from shared.bundle.parallel_verify import ranges, verify_in_place
from shared.errors import HashMismatchError, LengthMismatchError

BIG = DEFAULT_MIN_CHUNKED_FILE + 300_000  # chunked by the builder: 1 MiB chunks, the last short


def _bundle(tmp_path: Path, chunk_size: int | None = None) -> tuple[Path, SimpleNamespace, dict[str, int]]:
    """A real tar bundle (write_bundle) holding a big chunked blob and a small whole one; the
    manifest is a stand-in listing ``chunk_size`` chunks (default: the builder's choice)."""
    chunk_size = chunk_size or choose_chunk_size(BIG)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(BIG))
    sha, chunks = hash_chunks(big, chunk_size)
    small = tmp_path / "small"
    small.write_bytes(b"golden" * 500)
    small_sha = hashlib.sha256(small.read_bytes()).hexdigest()
    path = tmp_path / "b.bundle"
    write_bundle(path, b'{"payload": "not read here"}', {sha: big, small_sha: small})
    files = {
        "model": SimpleNamespace(sha256=sha, size=BIG, chunk_size=chunk_size, chunks=chunks),
        "golden": SimpleNamespace(sha256=small_sha, size=3000, chunk_size=None, chunks=None),
    }
    with tarfile.open(path) as tar:
        offsets = {m.name[len(BLOB_PREFIX):]: m.offset_data for m in tar.getmembers()[1:]}
    return path, SimpleNamespace(files=files), offsets


def _speculate(path: Path, manifest: SimpleNamespace, offsets: dict[str, int]) -> dict[tuple[int, int], str]:
    spec = speculative.start(path, workers=2)
    assert spec is not None
    return spec.digests(path, ranges(manifest, offsets))


def test_guessed_layout_is_the_vetted_one(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    with tarfile.open(path) as tar:
        members = [(m.offset_data, m.size) for m in tar.getmembers()[1:]]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert speculative.guess_members(fd, path.stat().st_size) == members
    finally:
        os.close(fd)
    known = _speculate(path, manifest, offsets)
    wanted = ranges(manifest, offsets)
    assert set(known) == set(wanted)  # every range hashed ahead: nothing is read again
    assert verify_in_place(path, manifest, offsets, workers=2, known=known) == BIG + 3000


@pytest.mark.parametrize("workers", [1, 2])
def test_tampered_chunk_is_refused(tmp_path: Path, workers: int) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    base = offsets[manifest.files["model"].sha256]
    raw = bytearray(path.read_bytes())
    raw[base + 5 * (1 << 20) + 7] ^= 0xFF
    path.write_bytes(bytes(raw))
    known = _speculate(path, manifest, offsets)
    assert known  # the tampered chunk's digest came from the speculation
    with pytest.raises(HashMismatchError, match=r"file hash .* of 'model' .* chunk 5 does not match"):
        verify_in_place(path, manifest, offsets, workers=workers, known=known)


def test_tampered_small_file_is_refused(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    base = offsets[manifest.files["golden"].sha256]
    raw = bytearray(path.read_bytes())
    raw[base + 10] ^= 0x01
    path.write_bytes(bytes(raw))
    known = _speculate(path, manifest, offsets)
    with pytest.raises(HashMismatchError, match=r"of 'golden'"):
        verify_in_place(path, manifest, offsets, workers=2, known=known)


def test_other_chunk_size_than_guessed_still_verifies(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path, chunk_size=256 * 1024)
    known = _speculate(path, manifest, offsets)
    model = manifest.files["model"]
    assert all(off < offsets[model.sha256] or off >= offsets[model.sha256] + BIG for off, _ in known)
    assert verify_in_place(path, manifest, offsets, workers=2, known=known) == BIG + 3000


def test_other_chunk_size_than_guessed_still_refuses_a_tampered_chunk(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path, chunk_size=256 * 1024)
    raw = bytearray(path.read_bytes())
    raw[offsets[manifest.files["model"].sha256] + 3 * 256 * 1024 + 1] ^= 0x10
    path.write_bytes(bytes(raw))
    known = _speculate(path, manifest, offsets)
    with pytest.raises(HashMismatchError, match=r"'model' .* chunk 3 does not match"):
        verify_in_place(path, manifest, offsets, workers=2, known=known)


def test_digests_at_other_ranges_are_not_used(tmp_path: Path) -> None:
    """A digest stands only for the exact range it was read from: the good digests of a
    tampered bundle, offered one byte off, do not hide the tampering."""
    path, manifest, offsets = _bundle(tmp_path)
    good = _speculate(path, manifest, offsets)
    raw = bytearray(path.read_bytes())
    raw[offsets[manifest.files["model"].sha256] + 2 * (1 << 20)] ^= 0xFF
    path.write_bytes(bytes(raw))
    off_by_one = {(off + 1, length): digest for (off, length), digest in good.items()}
    with pytest.raises(HashMismatchError, match=r"'model' .* chunk 2 does not match"):
        verify_in_place(path, manifest, offsets, workers=2, known=off_by_one)


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_file_is_refused(tmp_path: Path, workers: int) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    base = offsets[manifest.files["model"].sha256]
    with open(path, "r+b") as fh:
        fh.truncate(base + 6 * (1 << 20) + 5)
    known = _speculate(path, manifest, offsets)
    assert (base + 6 * (1 << 20), 1 << 20) not in known  # a short read records nothing
    with pytest.raises(LengthMismatchError, match=r"'model' .* chunk 6 ended after 5 of 1048576 bytes"):
        verify_in_place(path, manifest, offsets, workers=workers, known=known)


def test_a_file_replaced_meanwhile_gives_no_digests(tmp_path: Path) -> None:
    path, manifest, offsets = _bundle(tmp_path)
    spec = speculative.start(path, workers=2)
    assert spec is not None
    other = tmp_path / "other"
    other.write_bytes(path.read_bytes())
    os.replace(other, path)
    assert spec.digests(path, ranges(manifest, offsets)) == {}


def test_not_a_bundle_starts_nothing(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 4096)
    assert speculative.start(junk) is None
    assert speculative.start(tmp_path / "missing") is None


def test_cancel_stops_and_restores_the_switch_interval(tmp_path: Path) -> None:
    import sys

    before = sys.getswitchinterval()
    path, _, _ = _bundle(tmp_path)
    spec = speculative.start(path, workers=2)
    assert spec is not None
    spec.cancel()
    spec.cancel()  # twice is harmless
    assert sys.getswitchinterval() == before


def test_a_fifo_or_a_device_starts_nothing_and_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert speculative.start(fifo) is None  # opened without blocking, then refused
    assert speculative.start("/dev/zero") is None


def test_sizes_beyond_the_end_are_not_planned(tmp_path: Path) -> None:
    """A header may claim any size (pax ``size=``): nothing past the file is planned."""
    import io

    path = tmp_path / "lying.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.dsse.json", b"{}"), ("blobs/sha256/aa", b"x" * 1000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    pax = b"30 size=99999999999999999999\n"  # a pax header claiming ~10^20 bytes for the blob
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(pax)
    at = 1024  # after the envelope's header and data block
    raw[at:at] = header.tobuf(tarfile.USTAR_FORMAT) + pax.ljust(512, b"\0")
    path.write_bytes(bytes(raw))
    fd = os.open(path, os.O_RDONLY)
    try:
        members = speculative.guess_members(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert [size for _, size in members] == [10**20 - 1]
    assert len(speculative.plan(members, path.stat().st_size)) == 1  # one 16 MiB chunk, not 6e12
    spec = speculative.start(path)
    assert spec is not None
    assert spec.digests(path, spec.ranges) == {}  # a short read records nothing
