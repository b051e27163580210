"""The key directory: init, load, sign; private keys stay owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.bundle.keyring import init_keyring, load_keyring, sign_manifest
from shared.bundle.keys import load_private
from shared.errors import MalformedDocumentError


def test_init_load_and_sign(tmp_path: Path, make_manifest) -> None:
    ring = init_keyring(tmp_path / "keys", root_keys=3, root_threshold=2, signing_keys=2)
    files = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert files == ["root-1.key", "root-2.key", "root-3.key", "root.json", "roots", "signing-1.key",
                     "signing-2.key"]
    for p in (tmp_path / "keys").glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    root = ring.trust_root()
    assert root.payload.root.threshold == 2 and len(root.payload.root.keyids) == 3

    loaded = load_keyring(tmp_path / "keys")
    assert len(loaded.root_keys) == 3 and len(loaded.signing_keys) == 2
    env = sign_manifest(make_manifest(), loaded.signing_keys[:1])
    assert loaded.trust_root().verify_manifest(env).manifest.name == "detector"


def test_init_refuses_to_replace_a_root(tmp_path: Path) -> None:
    init_keyring(tmp_path, root_keys=1, root_threshold=1)
    with pytest.raises(MalformedDocumentError, match=r"already holds a root\.json; refusing to replace"):
        init_keyring(tmp_path, root_keys=1, root_threshold=1)


def test_load_refuses_directory_without_root(tmp_path: Path) -> None:
    with pytest.raises(MalformedDocumentError, match=r"holds no root\.json; create one with .edgefleet keys"):
        load_keyring(tmp_path)


def test_sign_needs_a_signing_key(make_manifest) -> None:
    with pytest.raises(MalformedDocumentError, match=r"no signing keys: a delegated signing-N\.key"):
        sign_manifest(make_manifest(), [])


def test_load_private_refuses_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a pem")
    with pytest.raises(MalformedDocumentError, match=r"cannot load private key .*bad\.key"):
        load_private(bad)


def test_init_threshold_above_key_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedDocumentError, match=r"role root threshold 3 must be 1\.\.2"):
        init_keyring(tmp_path, root_keys=2, root_threshold=3)
