"""Builders for keys, roots, manifests and bundle files used by the shared/ unit tests.

Everything here is pure and in memory (or in ``tmp_path``): no servers, no network.
Tests get the builders through fixtures, so no test imports this module.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.bundle import envelope as dsse
from shared.bundle.archive import blob_member, write_bundle
from shared.bundle.keyring import build_root
from shared.bundle.keys import generate
from shared.bundle.manifest import Manifest, parse_manifest
from shared.bundle.trust import ROOT_SCHEMA, TrustRoot
from shared.timeutil import format_ts, utcnow

MODEL_BYTES = b"not really onnx, but the archive does not care" * 50
GOLDEN_BYTES = b"golden vectors" * 20


@dataclass
class Keys:
    """Three root keys (threshold 2) and two online signing keys (threshold 1 by default)."""

    root: list[Ed25519PrivateKey]
    signers: list[Ed25519PrivateKey]
    stranger: Ed25519PrivateKey

    def trust(self, **kwargs: Any) -> TrustRoot:
        """A TrustRoot over these keys; kwargs go to ``build_root``."""
        kwargs.setdefault("signing_threshold", 1)
        return TrustRoot.load(build_root(self.root, 2, self.signers, **kwargs))


def file_ref(data: bytes, media_type: str = "application/octet-stream") -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "media_type": media_type}


def manifest_doc(**overrides: Any) -> dict[str, Any]:
    """A valid manifest as a plain dict; top-level keys replaced by ``overrides``."""
    now = utcnow()
    doc: dict[str, Any] = {
        "schema": "edgefleet.manifest/v1",
        "name": "detector",
        "release": 5,
        "version": "1.0.0",
        "created": format_ts(now),
        "expires": format_ts(now + timedelta(days=30)),
        "runtime": "onnxruntime",
        "quantization": {"mode": "none"},
        "min_agent_version": "0.1.0",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 2]}],
        "files": {
            "model": file_ref(MODEL_BYTES, "application/onnx"),
            "golden": file_ref(GOLDEN_BYTES, "application/x-npz"),
        },
        "golden_tolerance": {"atol": 1e-4, "rtol": 1e-3},
    }
    doc.update(copy.deepcopy(overrides))
    return doc


def sign_payload(payload: bytes, keys: list[Ed25519PrivateKey], ptype: str = dsse.MANIFEST_TYPE) -> bytes:
    return dsse.sign(ptype, payload, keys).to_json()


def sign_doc(doc: dict[str, Any], keys: list[Ed25519PrivateKey], ptype: str = dsse.MANIFEST_TYPE) -> bytes:
    return sign_payload(json.dumps(doc).encode(), keys, ptype)


def root_doc(
    root_keys: list[Ed25519PrivateKey],
    signers: list[Ed25519PrivateKey],
    **overrides: Any,
) -> dict[str, Any]:
    """A root payload as a dict (the same shape ``build_root`` writes), for crafting bad roots."""
    payload = json.loads(dsse.Envelope.from_json(build_root(root_keys, 2, signers)).payload)
    assert payload["schema"] == ROOT_SCHEMA
    payload.update(overrides)
    return payload


@dataclass
class BundleFiles:
    directory: Path
    model: Path
    golden: Path

    def blobs(self) -> dict[str, Path]:
        return {
            hashlib.sha256(self.model.read_bytes()).hexdigest(): self.model,
            hashlib.sha256(self.golden.read_bytes()).hexdigest(): self.golden,
        }


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(root=[generate() for _ in range(3)], signers=[generate() for _ in range(2)],
                stranger=generate())


@pytest.fixture(scope="session")
def trust(keys: Keys) -> TrustRoot:
    return keys.trust()


@pytest.fixture
def make_doc() -> Callable[..., dict[str, Any]]:
    return manifest_doc


@pytest.fixture
def make_manifest() -> Callable[..., Manifest]:
    def build(**overrides: Any) -> Manifest:
        return parse_manifest(json.dumps(manifest_doc(**overrides)).encode())

    return build


@pytest.fixture
def sign() -> Callable[..., bytes]:
    return sign_doc


@pytest.fixture
def bundle_files(tmp_path: Path) -> BundleFiles:
    model = tmp_path / "model.onnx"
    golden = tmp_path / "golden.npz"
    model.write_bytes(MODEL_BYTES)
    golden.write_bytes(GOLDEN_BYTES)
    return BundleFiles(tmp_path, model, golden)


@pytest.fixture
def good_bundle(tmp_path: Path, keys: Keys, bundle_files: BundleFiles) -> tuple[Path, bytes]:
    envelope = sign_doc(manifest_doc(), keys.signers[:1])
    out = tmp_path / "good.bundle"
    write_bundle(out, envelope, bundle_files.blobs())
    return out, envelope


@pytest.fixture
def blob_names() -> dict[str, str]:
    return {
        "model": blob_member(hashlib.sha256(MODEL_BYTES).hexdigest()),
        "golden": blob_member(hashlib.sha256(GOLDEN_BYTES).hexdigest()),
    }


@pytest.fixture
def make_root_doc() -> Callable[..., dict[str, Any]]:
    return root_doc


@pytest.fixture
def sign_raw() -> Callable[..., bytes]:
    return sign_payload
