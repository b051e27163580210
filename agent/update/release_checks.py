"""What a release is checked against before any of it is used, and how a verified one loads.

- Signatures, delegation scope and expiry against the trust root, at the best time the agent
  has (agent.update.clock); a bundle file may use the offline expiry grace, and says so.
- Then the model name, the desired digest and the release policy: agent version, and the
  anti-rollback floor, which fails closed when it is below a release the device holds.
- A release verified earlier is read back from its stored envelope, checked against its
  digest, and loaded in a new session of the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from agent.errors import (
    LoadError,
    StateError,
)
from agent.runtime.base import Backend
from agent.runtime.host import LoadedModel
from agent.update.blobs import BlobStore
from agent.update.lifecycle import ReleaseRef, Target
from agent.update.smoke import run_golden
from agent.update.store import StateStore
from shared.bundle.envelope import Envelope
from shared.bundle.manifest import Manifest, parse_manifest, payload_digest
from shared.bundle.trust import TrustRoot, VerifiedManifest, check_release_policy
from shared.errors import ExpiredError, HashMismatchError, MalformedDocumentError

# The installer's logger: operators grep one name for everything an update did.
log = logging.getLogger("agent.update.installer")


class ReleaseChecks:
    """The checks and loading the effects runner (agent.update.runner) uses; the installer
    assembles the attributes below."""

    store: StateStore
    blobs: BlobStore
    backend: Backend
    trust: TrustRoot
    agent_version: str
    expiry_now: Callable[[], datetime]
    offline_expiry_grace_s: float

    def verify_signed(self, envelope: bytes, *, offline: bool = False) -> VerifiedManifest:
        """Signatures, scope and expiry against the best time the agent has.

        For a bundle file (``offline``) whose only fault is an expiry within
        ``offline_expiry_grace_s`` of that time, accept it and log that the grace was used.
        Signatures are verified either way; anti-rollback is checked after, unchanged.
        """
        now = self.expiry_now()
        try:
            return self.trust.verify_manifest(envelope, now=now)
        except ExpiredError as exc:
            grace = self.offline_expiry_grace_s
            if not offline or grace <= 0:
                raise
            try:
                vm = self.trust.verify_manifest(envelope, now=now - timedelta(seconds=grace))
            except ExpiredError as again:
                raise ExpiredError(f"{again}; older than the offline grace of {grace:g} s "
                                   "(update.offline_expiry_grace_s)", **again.details) from None
            log.warning("model=%s r%s: OFFLINE EXPIRY GRACE used: %s (best time %s); accepted "
                        "because update.offline_expiry_grace_s = %g s", vm.manifest.name,
                        vm.manifest.release, exc, now.isoformat(timespec="seconds"), grace)
            return vm


    def _verify(self, name: str | None, target_digest: str | None, envelope: bytes, *,
                offline: bool = False) -> VerifiedManifest:
        return self._check_verified(name, target_digest, self.verify_signed(envelope, offline=offline))

    def _check_verified(self, name: str | None, target_digest: str | None,
                        vm: VerifiedManifest) -> VerifiedManifest:
        """The checks after the signatures: model name, desired digest, release policy."""
        if name is not None and vm.manifest.name != name:
            raise MalformedDocumentError(
                f"the envelope is for model {vm.manifest.name!r}, expected {name!r}"
            )
        if target_digest is not None and vm.digest != target_digest:
            raise HashMismatchError(
                f"the envelope's digest {vm.digest[:12]}… differs from the desired {target_digest[:12]}…"
            )
        check_release_policy(
            vm.manifest, vm.digest, agent_version=self.agent_version,
            highest=self._consistent_highest(vm.manifest.name),
        )
        return vm

    def _consistent_highest(self, name: str) -> tuple[int, str] | None:
        """The anti-rollback floor, refusing (fail closed) when it is below what the device holds.

        Activation writes the record, then raises the floor; ``recover`` closes that crash
        window at startup, before anything is verified. A floor below the active or previous
        release found later means the file was rolled back or damaged under a running agent.
        """
        highest = self.store.highest(name)
        rec = self.store.load(name)
        held = [r for r in (rec.active, rec.previous) if r is not None] if rec else []
        top = max((r.release for r in held), default=None)
        if top is not None and (highest is None or highest[0] < top):
            raise StateError(
                f"anti-rollback state for {name} says r{highest[0] if highest else 'none'} but this "
                f"device holds r{top}: the state file was rolled back or damaged; refusing every "
                "bundle for this model until an operator repairs it (restore antirollback.json)"
            )
        return highest

    def _stored_manifest(self, name: str, ref: ReleaseRef | Target) -> Manifest:
        """The manifest of a release verified earlier, from its stored envelope."""
        data = self.blobs.load_envelope(name, ref.release, ref.digest)
        if data is None:
            raise StateError(f"{name} r{ref.release}: its envelope is missing from state_dir")
        env = Envelope.from_json(data)
        if payload_digest(env.payload) != ref.digest:
            raise StateError(f"{name} r{ref.release}: the stored envelope does not match its digest")
        return parse_manifest(env.payload)

    def _load(self, manifest: Manifest, digest: str) -> LoadedModel:
        # The backend refuses a runtime it does not run (LoadError, reason "load").
        model_ref = manifest.files["model"]
        if not self.blobs.has(model_ref):
            raise LoadError(f"{manifest.name} r{manifest.release}: model blob is missing")
        session = self.backend.load(self.blobs.path(model_ref.sha256), manifest)
        return LoadedModel(manifest=manifest, release=manifest.release, digest=digest, session=session)

    def load_release(self, name: str, ref: ReleaseRef) -> LoadedModel:
        return self._load(self._stored_manifest(name, ref), ref.digest)

    def smoke_test(self, loaded: LoadedModel) -> None:
        """Run the golden inputs and compare with the golden outputs; raise SmokeTestError."""
        run_golden(loaded, self.blobs.path(loaded.manifest.files["golden"].sha256))
