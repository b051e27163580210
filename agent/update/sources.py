"""Where a bundle comes from: the fleet's HTTP API (envelope, then each missing blob whole
or by chunks) or a single-file bundle (offline install). The installer verifies the envelope
before it asks a source for any blob."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Protocol

from agent.errors import DownloadError
from agent.update.blobs import BlobStore
from agent.update.chunked import ChunkIndex, fetch_chunked
from agent.update.fetch import Fetcher
from agent.update.lifecycle import Target
from shared.bundle.archive import extract_blobs, read_envelope
from shared.bundle.trust import VerifiedManifest
from shared.errors import MalformedDocumentError

log = logging.getLogger(__name__)


class BundleSource(Protocol):
    def envelope(self) -> bytes: ...

    def fetch_blobs(self, verified: VerifiedManifest, blobs: BlobStore) -> frozenset[str]:
        """Place every missing blob; return the sha256 of those placed by this call, each
        hashed whole on the bytes written before it was placed (``BlobsPlaced.proven``)."""
        ...


class FleetSource:
    """Envelope and blobs from the fleet's HTTP API."""

    def __init__(self, fetcher: Fetcher, target: Target) -> None:
        if not target.envelope_url or not target.blob_url:
            raise ValueError("a fleet target needs envelope_url and blob_url")
        self.fetcher = fetcher
        self.target = target

    def envelope(self) -> bytes:
        assert self.target.envelope_url
        return self.fetcher.fetch_envelope(self.target.envelope_url)

    def fetch_blobs(self, verified: VerifiedManifest, blobs: BlobStore) -> frozenset[str]:
        """Each missing blob: by chunks when its entry lists them (reusing the chunks of every
        release on the device), else whole; both place a blob only once the whole file's
        hash matched (Fetcher._place, chunked's _place), so every one fetched is proven."""
        assert self.target.blob_url
        index: ChunkIndex | None = None
        stats = self.fetcher.stats
        before = (stats.network, stats.reused, stats.resumed)
        missing = blobs.missing(verified.manifest.files.values())
        for ref in missing:
            url = self.target.blob_url.replace("{sha256}", ref.sha256)
            if ref.chunks is None:
                self.fetcher.fetch_blob(url, ref, blobs)
                continue
            if index is None:
                index = ChunkIndex.build(blobs)
            fetch_chunked(self.fetcher, url, ref, blobs, index)
        if missing:
            net, reused, resumed = (a - b for a, b in zip(
                (stats.network, stats.reused, stats.resumed), before, strict=True))
            log.info("model=%s r%s: %d file(s), %d bytes: %d fetched, %d reused from installed "
                     "releases, %d kept from partials", verified.manifest.name, verified.manifest.release,
                     len(missing), sum(r.size for r in missing), net, reused, resumed)
        return frozenset(ref.sha256 for ref in missing)


class FileSource:
    """Envelope and blobs from a single-file bundle (offline install)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def envelope(self) -> bytes:
        try:
            return read_envelope(self.path)
        except FileNotFoundError:
            raise DownloadError(f"bundle file {self.path} does not exist") from None
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise MalformedDocumentError(f"{self.path} is not a bundle file: {exc}") from None

    def fetch_blobs(self, verified: VerifiedManifest, blobs: BlobStore) -> frozenset[str]:
        """Every blob of the bundle, each hashed whole while it is copied, placed only if it
        matched (shared.bundle.archive.extract_blobs): all of them are proven."""
        try:
            return frozenset(extract_blobs(self.path, verified, blobs.open_staging, blobs.commit))
        except (tarfile.TarError, EOFError) as exc:
            raise MalformedDocumentError(f"{self.path} is not a valid bundle archive: {exc}") from None
        finally:
            for ref in verified.manifest.files.values():
                blobs.discard(ref.sha256)
