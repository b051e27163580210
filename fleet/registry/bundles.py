"""Bundle registry: import uploaded single-file bundles and re-issue old releases.

Import order: read the envelope, verify it against the trust root (signatures over
the exact bytes, scope, expiry), vet every archive member against the manifest and
stream each blob hash-checked into the blob store; only then touch the database.
"""

from __future__ import annotations

import tarfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import func
from sqlmodel import Session, select

from fleet.db.models import Blob, Bundle
from fleet.errors import ConflictError
from fleet.registry.blobs import BlobStore
from shared.bundle import archive
from shared.bundle import envelope as dsse
from shared.bundle.keyring import Keyring, sign_manifest
from shared.bundle.manifest import Manifest, parse_manifest
from shared.bundle.trust import TrustRoot, VerifiedManifest
from shared.errors import MalformedDocumentError
from shared.timeutil import format_ts, parse_ts, utcnow

MIN_REISSUE_VALIDITY = timedelta(days=1)


class BundleConflictError(ConflictError):
    """The release number of a model is taken by a bundle with another digest."""

    code = "conflict"


def bundle_json(b: Bundle) -> dict[str, Any]:
    return {
        "id": b.id,
        "name": b.name,
        "release": b.release,
        "version": b.version,
        "digest": b.digest,
        "created": b.created,
        "expires": b.expires,
        "uploaded_at": format_ts(b.uploaded_at) if b.uploaded_at else None,
        "reissue_of": b.reissue_of,
        "files": b.files,
    }


def manifest_of(b: Bundle) -> Manifest:
    return parse_manifest(dsse.Envelope.from_json(b.envelope).payload)


def verify_archive(path: Path, trust: TrustRoot, blobs: BlobStore) -> VerifiedManifest:
    """Verify a bundle file and store its blobs; raise a named EdgefleetError when it is bad."""
    try:
        envelope = archive.read_envelope(path)
        verified = trust.verify_manifest(envelope)
        archive.extract_blobs(path, verified, blobs.writer, lambda _sha: None)
    except tarfile.TarError as exc:
        raise MalformedDocumentError(f"not a single-file bundle (uncompressed tar): {exc}") from None
    return verified


def _record_blobs(session: Session, manifest: Manifest) -> None:
    for ref in manifest.files.values():
        if session.get(Blob, ref.sha256) is None:
            session.add(Blob(sha256=ref.sha256, size=ref.size))


def register(session: Session, verified: VerifiedManifest) -> tuple[Bundle, bool]:
    """Insert a verified bundle; (existing, False) when the identical one is there."""
    m = verified.manifest
    existing = session.exec(select(Bundle).where(Bundle.digest == verified.digest)).first()
    if existing is not None:
        return existing, False
    taken = session.exec(select(Bundle).where(Bundle.name == m.name, Bundle.release == m.release)).first()
    if taken is not None:
        raise BundleConflictError(
            f"{m.name} release {m.release} already exists as bundle {taken.id} with digest "
            f"{taken.digest[:12]}…; this upload has digest {verified.digest[:12]}…. "
            "Release numbers are never reused: build it with a higher release.",
            bundle_id=taken.id,
        )
    _record_blobs(session, m)
    bundle = Bundle(
        name=m.name,
        release=m.release,
        version=m.version,
        digest=verified.digest,
        envelope=verified.envelope,
        created=m.created,
        expires=m.expires,
        reissue_of=m.reissue_of,
        files={role: ref.sha256 for role, ref in m.files.items()},
    )
    session.add(bundle)
    session.flush()
    return bundle, True


def import_bundle(session: Session, path: Path, *, trust: TrustRoot, blobs: BlobStore) -> tuple[Bundle, bool]:
    return register(session, verify_archive(path, trust, blobs))


def highest_release(session: Session, model: str) -> int:
    top = session.exec(select(func.max(Bundle.release)).where(Bundle.name == model)).first()
    return int(top or 0)


def reissue(session: Session, previous: Bundle, keyring: Keyring, *, now: datetime | None = None) -> Bundle:
    """Sign ``previous``'s manifest again as the model's next release, same files."""
    now = now or utcnow()
    old = manifest_of(previous)
    validity = max(parse_ts(old.expires) - parse_ts(old.created), MIN_REISSUE_VALIDITY)
    new = msgspec.structs.replace(
        old,
        release=highest_release(session, old.name) + 1,
        reissue_of=old.release,
        created=format_ts(now),
        expires=format_ts(now + validity),
    )
    envelope = sign_manifest(new, keyring.signing_keys)
    # Never hand devices something they would refuse: check it as a device would.
    verified = keyring.trust_root().verify_manifest(envelope, now=now)
    bundle, _ = register(session, verified)
    return bundle
