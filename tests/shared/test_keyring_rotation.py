"""Root rotation and delegations in a key directory, as `edgefleet keys rotate/delegate` do."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.bundle.keyring import delegate, init_keyring, load_keyring, rotate_root, sign_manifest
from shared.bundle.trust import TrustRoot
from shared.errors import ScopeError, SignatureError


def walk(pinned: bytes, directory: Path) -> TrustRoot:
    """What a device does: start from its pinned root and walk roots/ link by link."""
    root = TrustRoot.load(pinned)
    while (nxt := directory / "roots" / f"{root.version + 1}.root.json").exists():
        root = root.rotate(nxt.read_bytes())
    return root


def test_rotation_chain_walks_from_the_pinned_root(tmp_path: Path, make_manifest) -> None:  # type: ignore[no-untyped-def]
    ring = init_keyring(tmp_path, root_keys=3, root_threshold=2)
    pinned = ring.root_path.read_bytes()
    old_root_ids = set(ring.trust_root().payload.root.keyids)
    rotate_root(tmp_path, root_keys=2, root_threshold=2)
    rotate_root(tmp_path, root_keys=3, root_threshold=2)
    latest = walk(pinned, tmp_path)
    assert latest.version == 3
    assert not old_root_ids & set(latest.payload.root.keyids)
    assert len(list((tmp_path / "retired").glob("*.key"))) == 5
    for p in tmp_path.glob("root-*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # Delegations carry over: bundles signed by the online key still verify.
    env = sign_manifest(make_manifest(), load_keyring(tmp_path).signing_keys)
    assert latest.verify_manifest(env).delegation == "online"
    # Skipping a link is refused (version must be exactly N+1).
    with pytest.raises(Exception, match="version"):
        TrustRoot.load(pinned).rotate((tmp_path / "roots" / "3.root.json").read_bytes())


def test_delegation_scoped_to_models(tmp_path: Path, make_manifest) -> None:  # type: ignore[no-untyped-def]
    init_keyring(tmp_path)
    root = delegate(tmp_path, name="vision", models=["detector-*"], keys=2, threshold=2)
    assert root.version == 2
    ring = load_keyring(tmp_path)
    vision = ring.delegation_keys("vision")
    assert len(vision) == 2
    ok = sign_manifest(make_manifest(name="detector-front"), vision)
    assert root.verify_manifest(ok).delegation == "vision"
    with pytest.raises(ScopeError):
        root.verify_manifest(sign_manifest(make_manifest(name="ocr"), vision))
    with pytest.raises(SignatureError):
        root.verify_manifest(sign_manifest(make_manifest(name="detector-front"), vision[:1]))
    # Re-delegating replaces the old keys: signatures by them no longer count.
    delegate(tmp_path, name="vision", models=["detector-*"])
    with pytest.raises(SignatureError):
        load_keyring(tmp_path).trust_root().verify_manifest(ok)
