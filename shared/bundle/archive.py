"""The single-file bundle: an uncompressed tar of the envelope and content-addressed blobs.

Members, in this order:
    manifest.dsse.json        the signed envelope
    blobs/sha256/<hex>        one per file the manifest lists

Reading never trusts the tar headers: the envelope is verified first, then every
member is checked against the manifest (name listed, regular file, exact size, no
duplicates) before a byte is written, and each blob is hashed while it streams.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from shared.bundle.manifest import Manifest
from shared.bundle.trust import VerifiedManifest
from shared.errors import (
    HashMismatchError,
    LengthMismatchError,
    MalformedDocumentError,
    UnsafeArchiveError,
)

ENVELOPE_NAME = "manifest.dsse.json"
BLOB_PREFIX = "blobs/sha256/"
CHUNK = 1 << 20


def blob_member(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def write_bundle(out: Path, envelope: bytes, blobs: dict[str, Path]) -> None:
    """Write a bundle file atomically; ``blobs`` maps sha256 to a file holding it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(ENVELOPE_NAME)
        info.size = len(envelope)
        info.mode = 0o644

        tar.addfile(info, io.BytesIO(envelope))
        for sha, path in blobs.items():
            info = tarfile.TarInfo(blob_member(sha))
            info.size = Path(path).stat().st_size
            info.mode = 0o644
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)


def _not_a_bundle(path: Path, exc: tarfile.TarError) -> MalformedDocumentError:
    return MalformedDocumentError(f"{path} is not a readable bundle archive (uncompressed tar): {exc}")


def read_envelope(path: Path, *, max_bytes: int = 1 << 20) -> bytes:
    """Return the envelope bytes of a bundle file (the first member)."""
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.next()
            if member is None or member.name != ENVELOPE_NAME or not member.isreg():
                raise UnsafeArchiveError(f"bundle must start with a regular file {ENVELOPE_NAME}")
            if member.size > max_bytes:
                raise UnsafeArchiveError(f"envelope is {member.size} bytes, max {max_bytes}")
            fh = tar.extractfile(member)
            assert fh is not None
            return fh.read()
    except tarfile.TarError as exc:
        raise _not_a_bundle(path, exc) from None


def copy_verified(
    src: IO[bytes],
    dest: BinaryIO,
    *,
    size: int,
    sha256: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy exactly ``size`` bytes, refusing more or fewer, and check the hash."""
    digest = hashlib.sha256()
    remaining = size
    while remaining > 0:
        block = src.read(min(CHUNK, remaining))
        if not block:
            raise LengthMismatchError(
                f"file {sha256[:12]}… ended after {size - remaining} of {size} bytes"
            )
        digest.update(block)
        dest.write(block)
        remaining -= len(block)
        if progress:
            progress(len(block))
    if src.read(1):
        raise LengthMismatchError(f"file {sha256[:12]}… is longer than {size} bytes")
    if digest.hexdigest() != sha256:
        raise HashMismatchError(
            f"file hash {digest.hexdigest()[:12]}… does not match the manifest's {sha256[:12]}…"
        )


def check_members(tar: tarfile.TarFile, manifest: Manifest) -> list[tarfile.TarInfo]:
    """Vet every member against the manifest before anything is extracted."""
    expected = {blob_member(ref.sha256): ref.size for ref in manifest.files.values()}
    seen: set[str] = set()
    blobs = []
    try:
        members = tar.getmembers()
    except tarfile.TarError as exc:
        raise MalformedDocumentError(f"bundle archive is damaged: {exc}") from None
    for i, member in enumerate(members):
        name = member.name
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise UnsafeArchiveError(f"member {name!r} has an unsafe path")
        if not member.isreg():
            raise UnsafeArchiveError(f"member {name!r} is not a regular file (links, devices "
                                     "and directories are refused)")
        if name in seen:
            raise UnsafeArchiveError(f"member {name!r} appears twice")
        seen.add(name)
        if i == 0:
            if name != ENVELOPE_NAME:
                raise UnsafeArchiveError(f"first member must be {ENVELOPE_NAME}, got {name!r}")
            continue
        if name not in expected:
            raise UnsafeArchiveError(f"member {name!r} is not listed in the manifest")
        if member.size != expected[name]:
            raise LengthMismatchError(
                f"member {name!r} is {member.size} bytes, manifest says {expected[name]}"
            )
        blobs.append(member)
    missing = set(expected) - seen
    if missing:
        raise MalformedDocumentError(f"bundle lacks files listed in the manifest: {sorted(missing)}")
    return blobs


def extract_blobs(
    path: Path,
    verified: VerifiedManifest,
    store: Callable[[str, int], BinaryIO],
    commit: Callable[[str], None],
) -> list[str]:
    """Stream each vetted blob into ``store(sha, size)``, hash-checked, then ``commit(sha)``;
    return the sha256 of the blobs committed, in order.

    Every blob is proven by the SHA-256 of the very bytes written, whole, against its name
    (its manifest sha256): a chunked one is copied chunk by chunk (``os.pread`` at the member's
    data offset) and hashed on a worker thread while the copy goes on
    (shared/bundle/parallel_verify.copy_chunks_verified); others are hashed as they stream.
    ``commit`` runs only after the hash matched, so a returned sha needs no second pass.
    """
    from shared.bundle.parallel_verify import copy_chunks_verified

    refs = {ref.sha256: (role, ref) for role, ref in verified.manifest.files.items()}
    committed: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            members = check_members(tar, verified.manifest)
            for member in members:
                sha = member.name[len(BLOB_PREFIX):]
                role, ref = refs[sha]
                with store(sha, member.size) as dest:
                    if ref.chunks and ref.chunk_size:
                        copy_chunks_verified(path, member.offset_data, role, ref, dest)
                    else:
                        src = tar.extractfile(member)
                        assert src is not None
                        copy_verified(src, dest, size=member.size, sha256=sha)
                commit(sha)
                committed.append(sha)
    except tarfile.TarError as exc:
        raise _not_a_bundle(path, exc) from None
    return committed
