"""A signing key directory: root keys, delegated online keys and the pinned root.json.

Layout of DIR (private keys are 0600):
    root.json              the current trust root devices pin
    roots/N.root.json      every root version, so a device on version k can walk k+1..N
    root-1.key ...         offline root keys (keep them off the fleet server)
    signing-1.key ...      online keys of the delegation "online"
    delegation-NAME-1.key  online keys of another delegation NAME (scoped to some models)
    retired/               root keys rotated away (kept so old chains can be audited)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import strictjson
from shared.bundle import envelope as dsse
from shared.bundle.keys import generate, key_id, load_private, raw_public, save_private
from shared.bundle.manifest import Manifest, encode_manifest
from shared.bundle.trust import ROOT_SCHEMA, TrustRoot, parse_root_payload
from shared.errors import MalformedDocumentError
from shared.fsutil import atomic_write  # re-exported: callers outside the agent import it here
from shared.timeutil import in_days, parse_ts, utcnow


@dataclass
class Keyring:
    directory: Path
    root_keys: list[Ed25519PrivateKey]
    signing_keys: list[Ed25519PrivateKey]

    @property
    def root_path(self) -> Path:
        return self.directory / "root.json"

    def trust_root(self) -> TrustRoot:
        return TrustRoot.load(self.root_path.read_bytes())

    def delegation_keys(self, name: str) -> list[Ed25519PrivateKey]:
        """The private keys of one delegation ("online" is the default one)."""
        if name == "online":
            return self.signing_keys
        keys = [load_private(p) for p in sorted(self.directory.glob(f"delegation-{name}-*.key"))]
        if not keys:
            raise MalformedDocumentError(
                f"{self.directory} holds no keys of delegation {name!r}; create it with "
                f"'edgefleet keys delegate {self.directory} --name {name} --models PATTERN'"
            )
        return keys


def _key_entry(key: Ed25519PrivateKey) -> tuple[str, dict[str, str]]:
    pub = key.public_key()
    return key_id(pub), {"scheme": "ed25519", "public": raw_public(pub).hex()}


def root_payload(
    *,
    version: int,
    expires_days: float,
    root_public: list[Ed25519PublicKey],
    root_threshold: int,
    delegations: list[dict[str, object]],
    extra_keys: dict[str, dict[str, str]],
) -> bytes:
    """A root document. ``delegations`` hold name, keyids, threshold, models, expires."""
    keys = dict(extra_keys)
    for pub in root_public:
        keys[key_id(pub)] = {"scheme": "ed25519", "public": raw_public(pub).hex()}
    payload = {
        "schema": ROOT_SCHEMA,
        "version": version,
        "expires": in_days(expires_days),
        "keys": keys,
        "root": {"keyids": [key_id(p) for p in root_public], "threshold": root_threshold},
        "delegations": delegations,
    }
    raw = strictjson.dumps(payload)
    parse_root_payload(raw)
    return raw


def build_root(
    root_keys: list[Ed25519PrivateKey],
    root_threshold: int,
    signing_keys: list[Ed25519PrivateKey],
    signing_threshold: int = 1,
    *,
    version: int = 1,
    expires_days: float = 365,
    models: tuple[str, ...] = ("*",),
    sign_with: list[Ed25519PrivateKey] | None = None,
) -> bytes:
    signing = dict(_key_entry(k) for k in signing_keys)
    raw = root_payload(
        version=version,
        expires_days=expires_days,
        root_public=[k.public_key() for k in root_keys],
        root_threshold=root_threshold,
        delegations=[
            {
                "name": "online",
                "keyids": list(signing),
                "threshold": signing_threshold,
                "models": list(models),
                "expires": in_days(expires_days),
            }
        ],
        extra_keys=signing,
    )
    return dsse.sign(dsse.ROOT_TYPE, raw, sign_with or root_keys).to_json()


def init_keyring(
    directory: Path,
    *,
    root_keys: int = 3,
    root_threshold: int = 2,
    signing_keys: int = 1,
    expires_days: float = 365,
) -> Keyring:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "root.json").exists():
        raise MalformedDocumentError(f"{directory} already holds a root.json; refusing to replace")
    roots = [generate() for _ in range(root_keys)]
    signers = [generate() for _ in range(signing_keys)]
    for i, k in enumerate(roots, 1):
        save_private(k, directory / f"root-{i}.key")
    for i, k in enumerate(signers, 1):
        save_private(k, directory / f"signing-{i}.key")
    _write_root(directory, build_root(roots, root_threshold, signers, expires_days=expires_days))
    return Keyring(directory, roots, signers)


def load_keyring(directory: Path) -> Keyring:
    directory = Path(directory)
    if not (directory / "root.json").is_file():
        raise MalformedDocumentError(
            f"{directory} holds no root.json; create one with 'edgefleet keys init {directory}'"
        )
    roots = [load_private(p) for p in sorted(directory.glob("root-*.key"))]
    signers = [load_private(p) for p in sorted(directory.glob("signing-*.key"))]
    return Keyring(directory, roots, signers)


def sign_manifest(manifest: Manifest, signing_keys: list[Ed25519PrivateKey]) -> bytes:
    if not signing_keys:
        raise MalformedDocumentError("no signing keys: a delegated signing-N.key is needed")
    return dsse.sign(dsse.MANIFEST_TYPE, encode_manifest(manifest), signing_keys).to_json()


def _write_root(directory: Path, envelope: bytes) -> TrustRoot:
    root = TrustRoot.load(envelope)
    (directory / "roots").mkdir(exist_ok=True)
    atomic_write(directory / "roots" / f"{root.version}.root.json", envelope)
    atomic_write(directory / "root.json", envelope)
    return root


def _successor(
    ring: Keyring,
    *,
    root_keys: list[Ed25519PrivateKey],
    root_threshold: int,
    delegations: list[dict[str, object]],
    extra_keys: dict[str, dict[str, str]],
    expires_days: float,
) -> bytes:
    """Root N+1, signed by a threshold of root N's keys and of its own."""
    current = ring.trust_root()
    payload = root_payload(
        version=current.version + 1,
        expires_days=expires_days,
        root_public=[k.public_key() for k in root_keys],
        root_threshold=root_threshold,
        delegations=delegations,
        extra_keys=extra_keys,
    )
    signers = {key_id(k.public_key()): k for k in ring.root_keys + root_keys}
    envelope = dsse.sign(dsse.ROOT_TYPE, payload, list(signers.values())).to_json()
    current.rotate(envelope)  # proves the chain holds before anything is written
    return envelope


def _as_list(value: object) -> list[object]:
    """A delegation's list field (its entries are built here as lists)."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _current_delegations(root: TrustRoot) -> tuple[list[dict[str, object]], dict[str, dict[str, str]]]:
    delegations = [
        {"name": d.name, "keyids": list(d.keyids), "threshold": d.threshold,
         "models": list(d.models), "expires": d.expires}
        for d in root.payload.delegations
    ]
    used = {kid for d in root.payload.delegations for kid in d.keyids}
    keys = {
        kid: {"scheme": k.scheme, "public": k.public} for kid, k in root.payload.keys.items() if kid in used
    }
    return delegations, keys


def rotate_root(
    directory: Path, *, root_keys: int = 3, root_threshold: int = 2, expires_days: float = 365
) -> TrustRoot:
    """Replace the root keys: root N+1 with new keys, signed by the old and the new ones.

    Delegations carry over. Old root keys move to retired/; devices walk the chain in
    roots/ (each link signed by a threshold of the previous root).
    """
    ring = load_keyring(directory)
    if not ring.root_keys:
        raise MalformedDocumentError(f"{directory} holds no root-*.key: rotation needs the current root keys")
    new_keys = [generate() for _ in range(root_keys)]
    delegations, extra = _current_delegations(ring.trust_root())
    envelope = _successor(ring, root_keys=new_keys, root_threshold=root_threshold,
                          delegations=delegations, extra_keys=extra, expires_days=expires_days)
    version = TrustRoot.load(envelope).version
    retired = Path(directory) / "retired"
    retired.mkdir(exist_ok=True)
    for path in sorted(Path(directory).glob("root-*.key")):
        os.replace(path, retired / f"v{version - 1}-{path.name}")
    for i, key in enumerate(new_keys, 1):
        save_private(key, Path(directory) / f"root-{i}.key")
    return _write_root(Path(directory), envelope)


def delegate(
    directory: Path,
    *,
    name: str,
    models: list[str],
    keys: int = 1,
    threshold: int = 1,
    expires_days: float = 90,
) -> TrustRoot:
    """Add (or replace) delegation NAME with new online keys scoped to ``models``: root N+1."""
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 32:
        raise MalformedDocumentError(f"delegation name {name!r}: letters, digits, '-' and '_', at most 32")
    if not models:
        raise MalformedDocumentError("a delegation needs at least one model name pattern")
    ring = load_keyring(directory)
    root = ring.trust_root()
    new_keys = [generate() for _ in range(keys)]
    delegations, extra = _current_delegations(root)
    delegations = [d for d in delegations if d["name"] != name]
    for k in new_keys:
        pub = k.public_key()
        extra[key_id(pub)] = {"scheme": "ed25519", "public": raw_public(pub).hex()}
    delegations.append({"name": name, "keyids": [key_id(k.public_key()) for k in new_keys],
                        "threshold": threshold, "models": list(models), "expires": in_days(expires_days)})
    used = {str(kid) for d in delegations for kid in _as_list(d["keyids"])}
    extra = {kid: v for kid, v in extra.items() if kid in used}
    root_days_left = (parse_ts(root.payload.expires) - utcnow()).total_seconds() / 86400
    envelope = _successor(ring, root_keys=ring.root_keys, root_threshold=root.payload.root.threshold,
                          delegations=delegations, extra_keys=extra, expires_days=max(1.0, root_days_left))
    prefix = "signing" if name == "online" else f"delegation-{name}"
    for path in Path(directory).glob(f"{prefix}-*.key"):
        path.unlink()
    for i, key in enumerate(new_keys, 1):
        save_private(key, Path(directory) / f"{prefix}-{i}.key")
    return _write_root(Path(directory), envelope)
