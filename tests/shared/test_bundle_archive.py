"""The single-file bundle: round trip, and refusal of every crafted member that must not land."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from shared.bundle.archive import (
    ENVELOPE_NAME,
    check_members,
    copy_verified,
    extract_blobs,
    read_envelope,
)
from shared.errors import (
    HashMismatchError,
    LengthMismatchError,
    MalformedDocumentError,
    UnsafeArchiveError,
)

MODEL = b"not really onnx, but the archive does not care" * 50
GOLDEN = b"golden vectors" * 20


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_tar(path: Path, members: list[tuple]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, fh in members:
            tar.addfile(info, fh)
    return path


class _Store:
    """Collects extracted blobs in files under a directory, like the agent's blob store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.committed: list[str] = []

    def open(self, sha: str, size: int):  # type: ignore[no-untyped-def]
        return open(self.root / f"{sha}.part", "wb")

    def commit(self, sha: str) -> None:
        (self.root / f"{sha}.part").rename(self.root / sha)
        self.committed.append(sha)


def test_round_trip(tmp_path: Path, trust, good_bundle) -> None:
    path, envelope = good_bundle
    assert read_envelope(path) == envelope
    verified = trust.verify_manifest(read_envelope(path))
    with tarfile.open(path) as tar:
        names = [m.name for m in check_members(tar, verified.manifest)]
    assert names == [f"blobs/sha256/{hashlib.sha256(d).hexdigest()}" for d in (MODEL, GOLDEN)]
    out = tmp_path / "store"
    out.mkdir()
    store = _Store(out)
    extract_blobs(path, verified, store.open, store.commit)
    assert sorted(store.committed) == sorted(hashlib.sha256(d).hexdigest() for d in (MODEL, GOLDEN))
    assert (out / hashlib.sha256(MODEL).hexdigest()).read_bytes() == MODEL
    assert (out / hashlib.sha256(GOLDEN).hexdigest()).read_bytes() == GOLDEN


def test_write_bundle_leaves_no_temp_file(tmp_path: Path, good_bundle) -> None:
    assert not list(tmp_path.glob(".*.tmp"))


def _check(path: Path, trust, envelope: bytes) -> None:
    verified = trust.verify_manifest(envelope)
    with tarfile.open(path) as tar:
        check_members(tar, verified.manifest)


@pytest.mark.parametrize(
    ("extra", "error", "fragment"),
    [
        (lambda: _member("../x", b"data"), UnsafeArchiveError, "member '../x' has an unsafe path"),
        (lambda: _member("blobs/../../x", b"d"), UnsafeArchiveError, "has an unsafe path"),
        (lambda: _member("/etc/passwd", b"data"), UnsafeArchiveError,
         "member '/etc/passwd' has an unsafe path"),
        (lambda: _member("blobs\\x", b"data"), UnsafeArchiveError, "has an unsafe path"),
        (lambda: _member("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), UnsafeArchiveError,
         "member 'link' is not a regular file"),
        (lambda: _member("hard", kind=tarfile.LNKTYPE, linkname=ENVELOPE_NAME), UnsafeArchiveError,
         "member 'hard' is not a regular file"),
        (lambda: _member("dev", kind=tarfile.CHRTYPE, devmajor=1, devminor=3), UnsafeArchiveError,
         "member 'dev' is not a regular file"),
        (lambda: _member("fifo", kind=tarfile.FIFOTYPE), UnsafeArchiveError, "is not a regular file"),
        (lambda: _member("blobs", kind=tarfile.DIRTYPE), UnsafeArchiveError, "is not a regular file"),
        (lambda: _member("blobs/sha256/" + "0" * 64, b"data"), UnsafeArchiveError,
         "is not listed in the manifest"),
        (lambda: _member("notes.txt", b"hello"), UnsafeArchiveError,
         "member 'notes.txt' is not listed in the manifest"),
    ],
)
def test_check_members_refuses_extra_member(tmp_path, trust, good_bundle, blob_names, extra, error,
                                            fragment) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "bad.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], MODEL),
        extra(),
        _member(blob_names["golden"], GOLDEN),
    ])
    with pytest.raises(error) as info:
        _check(path, trust, envelope)
    assert fragment in str(info.value)


def test_refuses_duplicate_member(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "dup.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], MODEL),
        _member(blob_names["golden"], GOLDEN),
        _member(blob_names["model"], MODEL),
    ])
    with pytest.raises(UnsafeArchiveError, match=f"member '{blob_names['model']}' appears twice"):
        _check(path, trust, envelope)


def test_refuses_second_envelope(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "dup.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], MODEL),
        _member(blob_names["golden"], GOLDEN),
        _member(ENVELOPE_NAME, envelope),
    ])
    with pytest.raises(UnsafeArchiveError, match=r"'manifest.dsse.json' appears twice"):
        _check(path, trust, envelope)


def test_refuses_member_size_differing_from_manifest(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "size.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], MODEL + b"!"),
        _member(blob_names["golden"], GOLDEN),
    ])
    with pytest.raises(LengthMismatchError, match=f"is {len(MODEL) + 1} bytes, manifest says {len(MODEL)}"):
        _check(path, trust, envelope)


def test_refuses_missing_listed_file(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "missing.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], MODEL),
    ])
    with pytest.raises(MalformedDocumentError, match=r"bundle lacks files listed in the manifest"):
        _check(path, trust, envelope)


def test_refuses_first_member_not_envelope(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    path = _write_tar(tmp_path / "order.bundle", [
        _member(blob_names["model"], MODEL),
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["golden"], GOLDEN),
    ])
    with pytest.raises(UnsafeArchiveError, match=r"bundle must start with a regular file manifest.dsse.json"):
        read_envelope(path)
    with pytest.raises(UnsafeArchiveError, match=r"first member must be manifest.dsse.json"):
        _check(path, trust, envelope)


def test_read_envelope_refuses_link_and_oversize(tmp_path, good_bundle) -> None:
    _, envelope = good_bundle
    linked = _write_tar(tmp_path / "link.bundle",
                        [_member(ENVELOPE_NAME, kind=tarfile.SYMTYPE, linkname="/etc/passwd")])
    with pytest.raises(UnsafeArchiveError, match=r"must start with a regular file"):
        read_envelope(linked)
    big = _write_tar(tmp_path / "big.bundle", [_member(ENVELOPE_NAME, envelope)])
    with pytest.raises(UnsafeArchiveError, match=rf"envelope is {len(envelope)} bytes, max 100"):
        read_envelope(big, max_bytes=100)


def test_read_envelope_refuses_non_tar(tmp_path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x89PNG not a tar at all" * 40)
    with pytest.raises(MalformedDocumentError, match=r"is not a readable bundle archive"):
        read_envelope(junk)
    empty = tmp_path / "empty.bundle"
    empty.write_bytes(b"")
    with pytest.raises(MalformedDocumentError, match=r"is not a readable bundle archive"):
        read_envelope(empty)


def test_extract_refuses_swapped_blob_content(tmp_path, trust, good_bundle, blob_names) -> None:
    _, envelope = good_bundle
    evil = bytes(reversed(MODEL))  # same length, other bytes
    path = _write_tar(tmp_path / "swap.bundle", [
        _member(ENVELOPE_NAME, envelope),
        _member(blob_names["model"], evil),
        _member(blob_names["golden"], GOLDEN),
    ])
    store = _Store(tmp_path)
    with pytest.raises(HashMismatchError, match=r"does not match the manifest's"):
        extract_blobs(path, trust.verify_manifest(envelope), store.open, store.commit)
    assert store.committed == []


def test_extract_refuses_truncated_archive(tmp_path, trust, good_bundle) -> None:
    path, envelope = good_bundle
    data = path.read_bytes()
    verified = trust.verify_manifest(envelope)
    for cut_at in (600, 2660, len(envelope) + 2200):
        cut = tmp_path / "cut.bundle"
        cut.write_bytes(data[:cut_at])
        store = _Store(tmp_path)
        with pytest.raises(MalformedDocumentError, match=r"archive is damaged: unexpected end of data"):
            extract_blobs(cut, verified, store.open, store.commit)
        assert store.committed == []


# --- copy_verified ----------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_copy_verified_exact() -> None:
    data = b"x" * 3000
    dest = io.BytesIO()
    seen: list[int] = []
    copy_verified(io.BytesIO(data), dest, size=len(data), sha256=_sha(data), progress=seen.append)
    assert dest.getvalue() == data
    assert sum(seen) == len(data)


def test_copy_verified_empty_file() -> None:
    dest = io.BytesIO()
    copy_verified(io.BytesIO(b""), dest, size=0, sha256=_sha(b""))
    assert dest.getvalue() == b""


def test_copy_verified_truncated() -> None:
    data = b"x" * 3000
    with pytest.raises(LengthMismatchError, match=r"ended after 2999 of 3000 bytes"):
        copy_verified(io.BytesIO(data[:-1]), io.BytesIO(), size=3000, sha256=_sha(data))


def test_copy_verified_longer() -> None:
    data = b"x" * 3000
    with pytest.raises(LengthMismatchError, match=r"is longer than 3000 bytes"):
        copy_verified(io.BytesIO(data + b"y"), io.BytesIO(), size=3000, sha256=_sha(data))


def test_copy_verified_other_content() -> None:
    data = b"x" * 3000
    with pytest.raises(HashMismatchError, match=f"does not match the manifest's {_sha(data)[:12]}"):
        copy_verified(io.BytesIO(b"y" * 3000), io.BytesIO(), size=3000, sha256=_sha(data))
