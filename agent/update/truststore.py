"""The device's trust root: the pinned root.json, walked forward through the newer roots
this device accepted (state_dir/trust/N.root.json).

Each stored link was accepted only when a threshold of the previous root's keys and of
its own signed it and its version was exactly one more (TrustRoot.rotate). On start the
chain is walked again from the pinned file, so a tampered or missing link fails closed
instead of silently falling back to an older root.

Checking the chain's signatures needs cryptography (~6.5 MB of OpenSSL resident in the
agent from then on). A chain whose exact bytes this device already checked is recorded by
digest in state_dir/trust/verified; on a start that finds the same bytes, the roots are
parsed and validated but their signatures are not checked again, so an idle agent never
loads cryptography. Any changed byte (a new pinned root, an added or altered link) changes
the digest and the whole chain is checked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.errors import StateError
from shared.bundle.trust import TrustRoot
from shared.digest import sha256_small
from shared.errors import EdgefleetError, MalformedDocumentError
from shared.fsutil import atomic_write

MAX_LINKS = 64
VERIFIED = "verified"

log = logging.getLogger(__name__)


class TrustStore:
    def __init__(self, pinned: Path, state_dir: Path) -> None:
        self.pinned = Path(pinned)
        self.directory = Path(state_dir) / "trust"

    def _link(self, version: int) -> Path:
        return self.directory / f"{version}.root.json"

    def _chain(self) -> list[bytes]:
        """The pinned root's bytes and those of the stored links that follow it by number."""
        pinned = self.pinned.read_bytes()
        chain = [pinned]
        version = TrustRoot.load_verified(pinned).version
        for _ in range(MAX_LINKS):
            link = self._link(version + len(chain))
            try:
                chain.append(link.read_bytes())
            except FileNotFoundError:
                return chain
        raise StateError(f"more than {MAX_LINKS} stored trust roots in {self.directory}")

    @staticmethod
    def _digest(chain: list[bytes]) -> str:
        h = sha256_small(b"edgefleet trust chain v1\n")  # small roots: without OpenSSL
        for data in chain:
            h.update(sha256_small(data).digest())
        return h.hexdigest()

    def _verified_digest(self) -> str:
        try:
            return (self.directory / VERIFIED).read_text().strip()
        except OSError:
            return ""

    def load(self) -> TrustRoot:
        chain = self._chain()
        digest = self._digest(chain)
        if digest == self._verified_digest():
            return TrustRoot.load_verified(chain[-1])
        root = self._verify()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.directory / VERIFIED, (digest + "\n").encode())
        except OSError as exc:  # a read-only state dir costs a signature check per start, no more
            log.warning("cannot record the verified trust chain in %s: %s", self.directory, exc)
        return root

    def _verify(self) -> TrustRoot:
        root = TrustRoot.load(self.pinned.read_bytes())
        for _ in range(MAX_LINKS):
            nxt = self._link(root.version + 1)
            if not nxt.exists():
                return root
            try:
                root = root.rotate(nxt.read_bytes())
            except EdgefleetError as exc:
                raise StateError(
                    f"stored trust root {nxt} does not follow root v{root.version}: {exc}; refusing "
                    "to fall back to an older root (remove the bad file only if you know why it is there)"
                ) from None
        raise StateError(f"more than {MAX_LINKS} stored trust roots in {self.directory}")

    def update(self, envelopes: Iterable[bytes]) -> tuple[TrustRoot, list[int]]:
        """Walk forward through ``envelopes`` (any order); persist each accepted link."""
        current = self.load()
        candidates: dict[int, bytes] = {}
        for data in envelopes:
            version = TrustRoot.load(data).version  # self-consistent; chained below
            if version > current.version:
                candidates[version] = data
        accepted: list[int] = []
        while candidates:
            link = candidates.pop(current.version + 1, None)
            if link is None:
                raise MalformedDocumentError(
                    f"cannot reach trust root v{max(candidates)} from v{current.version}: "
                    f"v{current.version + 1} is missing (give every root from v{current.version + 1} on)"
                )
            current = current.rotate(link)
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self._link(current.version), link)
            accepted.append(current.version)
        return current, accepted

    def follow(self, fetch: Callable[[int], list[bytes]], target: int) -> tuple[TrustRoot, list[int]]:
        """Walk forward to root ``target`` with envelopes from ``fetch(after)`` (the fleet's
        roots above version ``after``, a page at a time), each link checked by update().

        The source is not trusted: a link that does not follow the root held raises (the
        links accepted before it stay), and so does a source that stops short of ``target``.
        """
        current = self.load()
        accepted: list[int] = []
        for _ in range(MAX_LINKS):
            if current.version >= target:
                return current, accepted
            envelopes = fetch(current.version)
            current, more = self.update(envelopes)
            if not more:
                raise MalformedDocumentError(
                    f"trust root v{target} was announced but no root after v{current.version} "
                    f"came with it ({len(envelopes)} envelope(s) received)"
                )
            accepted += more
        if current.version >= target:
            return current, accepted
        raise MalformedDocumentError(f"trust root v{target} is more than {MAX_LINKS} links away")
