"""Fixtures for the agent tests: real keys, real signed bundles, real onnxruntime."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from agent.config import AgentConfig, parse_config
from agent.runtime.host import ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from agent.update.blobs import BlobStore
from agent.update.installer import Installer
from agent.update.store import StateStore
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from shared.bundle.archive import ENVELOPE_NAME, blob_member, write_bundle
from shared.bundle.keyring import Keyring, init_keyring, sign_manifest
from shared.bundle.manifest import FileRef
from shared.bundle.trust import TrustRoot, VerifiedManifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return init_keyring(tmp_path_factory.mktemp("keys"), root_keys=1, root_threshold=1)


@pytest.fixture(scope="session")
def other_keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    """Keys the device does not trust."""
    return init_keyring(tmp_path_factory.mktemp("otherkeys"), root_keys=1, root_threshold=1)


@dataclass
class Bundles:
    """Builds signed bundles of the demo classifier; cached per (variant, release)."""

    directory: Path
    keyring: Keyring
    _cache: dict[tuple[Any, ...], Path] = field(default_factory=dict)

    def model(self, variant: str = "good", seed: int = 0) -> Path:
        path = self.directory / f"{variant}-{seed}.onnx"
        if not path.exists():
            if variant == "garbage":
                path.write_bytes(b"this is not an onnx model" * 10)
            else:
                write_classifier(path, faulty=variant == "faulty", seed=seed)
        return path

    def build(self, release: int, *, variant: str = "good", seed: int = 0,
              keyring: Keyring | None = None, **kw: Any) -> Path:
        # Keyed by the keyring's directory, not id(): ids are reused once a keyring is freed,
        # which handed a later test a bundle signed by another test's keys.
        ring = str((keyring or self.keyring).directory)
        key = (release, variant, seed, ring, tuple(sorted(kw.items())))
        if key not in self._cache:
            out = self.directory / f"m-r{release}-{variant}-{seed}-{len(self._cache)}.bundle"
            build_bundle(self.model(variant, seed), name=kw.pop("name", "clf"), version=f"1.{release}",
                         release=release, keyring=keyring or self.keyring, out=out,
                         golden_inputs=golden_inputs(), **kw)
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Bundles:
    return Bundles(tmp_path_factory.mktemp("bundles"), keyring)


def read_bundle(path: Path) -> tuple[bytes, dict[str, bytes]]:
    """The envelope and the blobs (by sha256) of a bundle file."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    env = members.pop(ENVELOPE_NAME)
    return env, {name.rsplit("/", 1)[1]: data for name, data in members.items()}


def verified(path: Path, keyring: Keyring) -> VerifiedManifest:
    return keyring.trust_root().verify_manifest(read_bundle(path)[0])


def write_raw_bundle(out: Path, envelope: bytes, blobs: dict[str, bytes]) -> Path:
    """A bundle whose member names and contents are taken as given (for tampering)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(ENVELOPE_NAME, envelope), *((blob_member(k), v) for k, v in blobs.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def resign(src: Path, out: Path, keyring: Keyring, *, replace_files: dict[str, bytes] | None = None,
           **changes: Any) -> Path:
    """Re-sign ``src``'s manifest with ``changes`` and some files replaced (by role)."""
    env, blobs = read_bundle(src)
    manifest = keyring.trust_root().verify_manifest(env).manifest
    files = dict(manifest.files)
    for role, data in (replace_files or {}).items():
        sha = hashlib.sha256(data).hexdigest()
        blobs.pop(files[role].sha256, None)
        blobs[sha] = data
        files[role] = FileRef(sha256=sha, size=len(data), media_type=files[role].media_type)
    manifest = msgspec.structs.replace(manifest, files=files, **changes)
    tmpdir = out.parent / f".{out.name}.blobs"
    tmpdir.mkdir(exist_ok=True)
    paths = {}
    for sha, data in blobs.items():
        (tmpdir / sha).write_bytes(data)
        paths[sha] = tmpdir / sha
    write_bundle(out, sign_manifest(manifest, keyring.signing_keys), paths)
    return out


@pytest.fixture
def make_config(tmp_path: Path, keyring: Keyring) -> Callable[..., AgentConfig]:
    def make(**doc: Any) -> AgentConfig:
        base: dict[str, Any] = {
            "state_dir": str(tmp_path / "state"),
            "trust_root": str(keyring.root_path),
            "api": {"listen": "127.0.0.1:0"},
        }
        base.update(doc)
        return parse_config(base)

    return make


@dataclass
class Rig:
    """The update parts of an agent, assembled like agent.main does, with events recorded."""

    state_dir: Path
    trust: TrustRoot
    host: ModelHost
    installer: Installer
    events: list[tuple[Any, ...]]

    def kinds(self) -> list[str]:
        return [e[1] for e in self.events]

    def predict(self, x: np.ndarray, name: str = "clf") -> dict[str, np.ndarray]:
        return self.host.predict(name, {"x": x})[1]


def make_rig(state_dir: Path, keyring: Keyring, **kw: Any) -> Rig:
    events: list[tuple[Any, ...]] = []
    host = ModelHost()
    trust = keyring.trust_root()
    installer = Installer(
        store=StateStore(state_dir), blobs=BlobStore(state_dir), host=host, trust_root=trust,
        backend=OnnxBackend(), emit=lambda *e: events.append(e), **kw,
    )
    return Rig(state_dir, trust, host, installer, events)


@pytest.fixture
def rig(tmp_path: Path, keyring: Keyring) -> Rig:
    return make_rig(tmp_path / "state", keyring)
