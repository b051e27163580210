"""Trust decisions about bundles, apart from any I/O.

Rules (python-tuf's TrustedMetadataSet is the model):
- the device pins a root: a self-signed document listing keys, the root role's key
  ids and threshold, and delegations to online signing keys;
- a root is accepted only when a threshold of its own root role signed it; a new root
  must have version old+1 and be signed by a threshold of the old root role *and*
  of its own;
- a manifest is accepted when a threshold of one delegation's keys signed the exact
  bytes; only then is it parsed, and the delegation must cover its model name;
- the root, the delegation and the manifest must all be unexpired;
- anti-rollback: a release below the highest seen for its model is refused, and so
  is the same release number with a different digest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from datetime import datetime
from typing import Literal

import msgspec

from shared import strictjson
from shared.bundle import envelope as dsse
from shared.bundle.keys import key_id_of_raw, raw_from_hex
from shared.bundle.manifest import Manifest, parse_manifest, payload_digest
from shared.errors import (
    AgentTooOldError,
    ExpiredError,
    MalformedDocumentError,
    RollbackError,
    ScopeError,
    SignatureError,
)
from shared.timeutil import parse_ts, utcnow
from shared.versioning import parse_version

ROOT_SCHEMA = "edgefleet.root/v1"
MAX_ROOT_BYTES = 256 * 1024


class KeySpec(msgspec.Struct, forbid_unknown_fields=True):
    scheme: Literal["ed25519"]
    public: str


class RoleSpec(msgspec.Struct, forbid_unknown_fields=True):
    keyids: list[str]
    threshold: int


class Delegation(msgspec.Struct, forbid_unknown_fields=True):
    """Online signing keys the root allows to sign manifests of matching model names."""

    name: str
    keyids: list[str]
    threshold: int
    models: list[str]
    expires: str


class RootPayload(msgspec.Struct, forbid_unknown_fields=True):
    schema: str
    version: int
    expires: str
    keys: dict[str, KeySpec]
    root: RoleSpec
    delegations: list[Delegation]


class VerifiedManifest(msgspec.Struct, frozen=True):
    manifest: Manifest
    digest: str
    envelope: bytes
    delegation: str


def _check_role(name: str, role: RoleSpec | Delegation, keys: Mapping[str, object]) -> None:
    if len(set(role.keyids)) != len(role.keyids):
        raise MalformedDocumentError(f"role {name} lists a key twice")
    missing = [k for k in role.keyids if k not in keys]
    if missing:
        raise MalformedDocumentError(f"role {name} names unknown key ids {missing}")
    if not 1 <= role.threshold <= len(role.keyids):
        raise MalformedDocumentError(
            f"role {name} threshold {role.threshold} must be 1..{len(role.keyids)}"
        )


def parse_root_payload(payload: bytes) -> RootPayload:
    root = strictjson.decode(payload, RootPayload, max_bytes=MAX_ROOT_BYTES, what="root")
    if root.schema != ROOT_SCHEMA:
        raise MalformedDocumentError(f"root schema {root.schema!r}, expected {ROOT_SCHEMA!r}")
    if root.version < 1:
        raise MalformedDocumentError("root version must be at least 1")
    parse_ts(root.expires, field="root expires")
    for kid, spec in root.keys.items():
        if key_id_of_raw(raw_from_hex(spec.public)) != kid:
            raise MalformedDocumentError(f"key id {kid[:12]}… does not match its public key")
    _check_role("root", root.root, root.keys)
    names = set()
    for d in root.delegations:
        if d.name in names:
            raise MalformedDocumentError(f"delegation {d.name!r} listed twice")
        names.add(d.name)
        _check_role(f"delegation {d.name}", d, root.keys)
        parse_ts(d.expires, field=f"delegation {d.name} expires")
        if not d.models:
            raise MalformedDocumentError(f"delegation {d.name} covers no models")
    return root


class TrustRoot:
    """A verified root document and the decisions it supports."""

    def __init__(self, payload: RootPayload, envelope_bytes: bytes) -> None:
        self.payload = payload
        self.envelope_bytes = envelope_bytes
        self._keys: dict[str, bytes] = {}  # key id -> raw public key, decoded when first needed

    @property
    def version(self) -> int:
        return self.payload.version

    def _role_keys(self, role: RoleSpec | Delegation) -> dict[str, bytes]:
        for kid in role.keyids:
            if kid not in self._keys:
                self._keys[kid] = raw_from_hex(self.payload.keys[kid].public)
        return {kid: self._keys[kid] for kid in role.keyids}

    @classmethod
    def load(cls, data: bytes) -> TrustRoot:
        """Load a pinned root: it must be signed by a threshold of its own root role."""
        env = dsse.Envelope.from_json(data, max_bytes=MAX_ROOT_BYTES)
        if env.payload_type != dsse.ROOT_TYPE:
            raise SignatureError(f"root envelope carries {env.payload_type!r}")
        # Self-signed: the payload must be parsed to learn its keys. The bytes are size
        # capped and strictly parsed, and nothing is trusted until the threshold holds.
        payload = parse_root_payload(env.payload)
        root = cls(payload, data)
        dsse.verify(
            env,
            payload_type=dsse.ROOT_TYPE,
            trusted=root._role_keys(payload.root),
            threshold=payload.root.threshold,
            role="root",
        )
        return root

    @classmethod
    def load_verified(cls, data: bytes) -> TrustRoot:
        """A root whose signatures this device already checked (its bytes are unchanged
        since): parsed and validated like ``load``, its signatures not checked again."""
        env = dsse.Envelope.from_json(data, max_bytes=MAX_ROOT_BYTES)
        if env.payload_type != dsse.ROOT_TYPE:
            raise SignatureError(f"root envelope carries {env.payload_type!r}")
        return cls(parse_root_payload(env.payload), data)

    def rotate(self, data: bytes) -> TrustRoot:
        """Accept root version N+1 signed by a threshold of root N and of itself."""
        new = TrustRoot.load(data)
        if new.version != self.version + 1:
            raise RollbackError(
                f"new root has version {new.version}; expected {self.version + 1}",
                got=new.version,
                expected=self.version + 1,
            )
        env = dsse.Envelope.from_json(data, max_bytes=MAX_ROOT_BYTES)
        dsse.verify(
            env,
            payload_type=dsse.ROOT_TYPE,
            trusted=self._role_keys(self.payload.root),
            threshold=self.payload.root.threshold,
            role=f"root v{self.version} (signing its successor)",
        )
        return new

    def check_unexpired(self, now: datetime) -> None:
        if parse_ts(self.payload.expires) <= now:
            raise ExpiredError(
                f"trust root v{self.version} expired at {self.payload.expires}",
                expires=self.payload.expires,
            )

    def verify_manifest(
        self, envelope_bytes: bytes, *, now: datetime | None = None
    ) -> VerifiedManifest:
        """Verify signatures over the exact bytes, then parse, then check scope and expiry."""
        now = now or utcnow()
        env = dsse.Envelope.from_json(envelope_bytes)
        if env.payload_type != dsse.MANIFEST_TYPE:
            raise SignatureError(
                f"envelope carries {env.payload_type!r}, expected a manifest"
            )
        self.check_unexpired(now)
        signed_by: list[Delegation] = []
        best = 0
        for d in self.payload.delegations:
            good = dsse.valid_keyids(env, self._role_keys(d))
            if len(good) >= d.threshold:
                signed_by.append(d)
            best = max(best, len(good))
        if not signed_by:
            known = {kid for d in self.payload.delegations for kid in d.keyids}
            unknown = sum(1 for s in env.signatures if s.keyid not in known)
            raise SignatureError(
                f"manifest is not signed by a threshold of any delegation "
                f"(best: {best} valid signature(s))"
                + (f"; {unknown} signature(s) by keys the root does not delegate" if unknown else ""),
                best=best,
            )
        manifest = parse_manifest(env.payload)
        in_scope = [
            d for d in signed_by if any(fnmatch.fnmatchcase(manifest.name, p) for p in d.models)
        ]
        if not in_scope:
            raise ScopeError(
                f"model {manifest.name!r} is outside the scope of the signing delegation(s) "
                f"{[d.name for d in signed_by]}"
            )
        live = [d for d in in_scope if parse_ts(d.expires) > now]
        if not live:
            d = in_scope[0]
            raise ExpiredError(f"delegation {d.name!r} expired at {d.expires}", expires=d.expires)
        if parse_ts(manifest.expires) <= now:
            raise ExpiredError(
                f"manifest {manifest.name} r{manifest.release} expired at {manifest.expires}",
                expires=manifest.expires,
            )
        return VerifiedManifest(manifest, payload_digest(env.payload), envelope_bytes, live[0].name)


def check_release_policy(
    manifest: Manifest,
    digest: str,
    *,
    agent_version: str,
    highest: tuple[int, str] | None,
) -> None:
    """Device-side policy after signatures: agent version and anti-rollback."""
    if parse_version(agent_version) < parse_version(manifest.min_agent_version):
        raise AgentTooOldError(
            f"bundle needs agent {manifest.min_agent_version}, this agent is {agent_version}"
        )
    if highest is None:
        return
    top_release, top_digest = highest
    if manifest.release < top_release:
        raise RollbackError(
            f"{manifest.name} release {manifest.release} is older than release {top_release} "
            "already accepted on this device",
            release=manifest.release,
            highest=top_release,
        )
    if manifest.release == top_release and digest != top_digest:
        raise RollbackError(
            f"{manifest.name} release {manifest.release} was already accepted with another "
            "manifest; a release number cannot be reused",
            release=manifest.release,
        )
