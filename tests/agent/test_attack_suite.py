"""The bundle attack suite: each case is an attack a device must refuse, with the specific
reason code, leaving the active model serving and the persisted trust state unchanged.

Network-level attacks (stalled and trickling downloads, endless bodies, compressed
responses that would inflate past the cap) are in test_update_*.py against a real HTTP
server; this file covers what a bundle, its signatures and its archive can carry.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from agent.errors import StateError
from fleet.demo.models import golden_inputs
from shared.bundle import envelope as dsse
from shared.bundle.archive import ENVELOPE_NAME, blob_member
from shared.bundle.keyring import Keyring, build_root, sign_manifest
from shared.bundle.keys import generate
from shared.bundle.trust import TrustRoot
from shared.errors import EdgefleetError
from shared.strictjson import dumps
from shared.timeutil import format_ts, in_days, utcnow

from .conftest import Bundles, Rig, make_rig, read_bundle, resign, write_raw_bundle

GOOD_RELEASE = 5


def _state_snapshot(rig: Rig) -> dict[str, Any]:
    rec = rig.installer.store.load("clf")
    return {
        "highest": rig.installer.store.highest("clf"),
        "active": rec.active if rec else None,
        "previous": rec.previous if rec else None,
    }


@pytest.fixture
def armed(rig: Rig, bundles: Bundles) -> Rig:
    """A device serving a good release 5 of model 'clf'."""
    rig.installer.install_file(bundles.build(GOOD_RELEASE))
    assert rig.host.get("clf").release == GOOD_RELEASE
    return rig


def assert_refused(rig: Rig, attack: Callable[[], object], reason: str, match: str = "") -> EdgefleetError:
    before = _state_snapshot(rig)
    x = golden_inputs()["x"]
    expected = rig.predict(x)["probs"]
    with pytest.raises(EdgefleetError) as info:
        attack()
    assert info.value.code == reason, f"expected reason {reason!r}, got {info.value.code!r}: {info.value}"
    if match:
        assert match in str(info.value), str(info.value)
    # The active model still serves, the same release, the same outputs; trust state unchanged.
    assert rig.host.get("clf").release == GOOD_RELEASE
    np.testing.assert_allclose(rig.predict(x)["probs"], expected)
    assert _state_snapshot(rig) == before
    return info.value


def _manifest(path: Path, keyring: Keyring) -> Any:
    return keyring.trust_root().verify_manifest(read_bundle(path)[0]).manifest


def _raw_tar(out: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in members:
            payload = data.get(info.name)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out


def _file_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


# -- signatures and trust -----------------------------------------------------------------

def test_tampered_model_bytes(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env, blobs = read_bundle(bundles.build(6))
    model_sha = _manifest(bundles.build(6), bundles.keyring).files["model"].sha256
    blobs[model_sha] = blobs[model_sha][:-1] + bytes([blobs[model_sha][-1] ^ 1])
    bad = write_raw_bundle(tmp_path / "t.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "hash")


def test_tampered_manifest_field(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env, blobs = read_bundle(bundles.build(6))
    parsed = dsse.Envelope.from_json(env)
    payload = parsed.payload.replace(b'"release":6', b'"release":9')
    assert payload != parsed.payload
    forged = dsse.Envelope(parsed.payload_type, payload, parsed.signatures).to_json()
    bad = write_raw_bundle(tmp_path / "t.bundle", forged, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "signature")


def test_signature_by_unknown_key(armed: Rig, bundles: Bundles, other_keyring: Keyring) -> None:
    bad = bundles.build(6, keyring=other_keyring)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "signature", "delegation")


def test_wrong_payload_type(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env, blobs = read_bundle(bundles.build(6))
    parsed = dsse.Envelope.from_json(env)
    # A validly signed root-typed envelope carrying the manifest bytes.
    forged = dsse.sign(dsse.ROOT_TYPE, parsed.payload, bundles.keyring.signing_keys).to_json()
    bad = write_raw_bundle(tmp_path / "t.bundle", forged, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "signature")


def _keyring(directory: Path, roots: list[Any], signers: list[Any], root_bytes: bytes) -> Keyring:
    """A keyring whose pinned root.json is ``root_bytes`` (build_bundle verifies against it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.json").write_bytes(root_bytes)
    return Keyring(directory, roots, signers)


def _rig_with_root(tmp_path: Path, root_bytes: bytes, keyring: Keyring) -> Rig:
    return make_rig(tmp_path / "state2", _keyring(tmp_path / "custom", [], [], root_bytes))


def test_below_threshold_signatures(bundles: Bundles, tmp_path: Path) -> None:
    roots = [generate()]
    signers = [generate(), generate()]
    root = build_root(roots, 1, signers, signing_threshold=2)
    two = _keyring(tmp_path / "two", roots, signers, root)
    rig = _rig_with_root(tmp_path, root, two)
    rig.installer.install_file(bundles.build(GOOD_RELEASE, keyring=two))
    one = _keyring(tmp_path / "one", roots, signers[:1], root)
    bad = resign(bundles.build(6, keyring=two), tmp_path / "one.bundle", one)
    assert_refused(rig, lambda: rig.installer.install_file(bad), "signature", "threshold")


def test_duplicate_signature_by_one_key_counts_once(bundles: Bundles, tmp_path: Path) -> None:
    roots = [generate()]
    signers = [generate(), generate()]
    root = build_root(roots, 1, signers, signing_threshold=2)
    kr = _keyring(tmp_path / "kr", roots, signers, root)
    rig = _rig_with_root(tmp_path, root, kr)
    rig.installer.install_file(bundles.build(GOOD_RELEASE, keyring=kr))
    env, blobs = read_bundle(bundles.build(6, keyring=kr))
    parsed = dsse.Envelope.from_json(env)
    first = parsed.signatures[0]
    doubled = dsse.Envelope(parsed.payload_type, parsed.payload, (first, first)).to_json()
    bad = write_raw_bundle(tmp_path / "d.bundle", doubled, blobs)
    assert_refused(rig, lambda: rig.installer.install_file(bad), "signature")


def test_key_signing_outside_its_scope(bundles: Bundles, tmp_path: Path) -> None:
    roots, signers = [generate()], [generate()]
    scoped = build_root(roots, 1, signers, models=("detector-*",))
    wide = build_root(roots, 1, signers)
    kr = _keyring(tmp_path / "kr", roots, signers, wide)
    rig = _rig_with_root(tmp_path, wide, kr)
    rig.installer.install_file(bundles.build(GOOD_RELEASE, keyring=kr))
    # The device now pins a root whose only delegation covers detector-* models.
    rig.installer.trust = TrustRoot.load(scoped)
    bad = bundles.build(6, keyring=kr)
    assert_refused(rig, lambda: rig.installer.install_file(bad), "scope", "outside")


def test_expired_manifest(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    bad = resign(bundles.build(6), tmp_path / "e.bundle", bundles.keyring, expires=format_ts(utcnow()))
    assert_refused(armed, lambda: armed.installer.install_file(bad), "expired", "expired")


def test_expired_delegation(bundles: Bundles, tmp_path: Path) -> None:
    roots, signers = [generate()], [generate()]
    root = build_root(roots, 1, signers)
    kr = _keyring(tmp_path / "kr", roots, signers, root)
    rig = _rig_with_root(tmp_path, root, kr)
    rig.installer.install_file(bundles.build(GOOD_RELEASE, keyring=kr))
    # The same root keys re-issue the root with a delegation that has already expired.
    expired_root = build_root(roots, 1, signers, expires_days=-1 / 24, version=1)
    payload = dsse.Envelope.from_json(expired_root).payload
    doc = msgspec.json.decode(payload)
    doc["expires"] = in_days(30)  # the root itself is fine, only the delegation expired
    root_env = dsse.sign(dsse.ROOT_TYPE, dumps(doc), roots).to_json()
    rig.installer.trust = TrustRoot.load(root_env)
    bad = resign(bundles.build(6, keyring=kr), tmp_path / "late.bundle", kr)
    assert_refused(rig, lambda: rig.installer.install_file(bad), "expired", "delegation")


def test_rotated_away_root_key(bundles: Bundles, tmp_path: Path) -> None:
    old_roots, old_signers = [generate(), generate()], [generate()]
    root_v1 = build_root(old_roots, 2, old_signers)
    kr_old = _keyring(tmp_path / "old", old_roots, old_signers, root_v1)
    rig = _rig_with_root(tmp_path, root_v1, kr_old)
    rig.installer.install_file(bundles.build(GOOD_RELEASE, keyring=kr_old))
    # Rotation: v2 drops the old online key; signed by both the old and the new roots.
    new_roots, new_signers = [generate(), generate()], [generate()]
    root_v2 = build_root(new_roots, 2, new_signers, version=2, sign_with=old_roots + new_roots)
    rig.installer.trust = rig.installer.trust.rotate(root_v2)
    bad = bundles.build(6, keyring=kr_old)  # signed by the rotated-away online key
    assert_refused(rig, lambda: rig.installer.install_file(bad), "signature")
    # A rotation signed only by the new keys is refused outright.
    rogue = build_root([generate()], 1, [generate()], version=3)
    with pytest.raises(EdgefleetError):
        rig.installer.trust.rotate(rogue)


# -- release policy ----------------------------------------------------------------------

def test_replayed_older_release(armed: Rig, bundles: Bundles) -> None:
    old = bundles.build(4)
    assert_refused(armed, lambda: armed.installer.install_file(old), "rollback", "older")


def test_same_release_number_different_digest(armed: Rig, bundles: Bundles) -> None:
    other = bundles.build(GOOD_RELEASE, seed=7)
    assert_refused(armed, lambda: armed.installer.install_file(other), "rollback", "already")


def test_manifest_asking_for_newer_agent(armed: Rig, bundles: Bundles) -> None:
    bad = bundles.build(6, min_agent_version="99.0.0")
    assert_refused(armed, lambda: armed.installer.install_file(bad), "agent_version", "99.0.0")


def test_golden_vectors_that_fail(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    golden_sha = _manifest(src, bundles.keyring).files["golden"].sha256
    golden = dict(np.load(io.BytesIO(read_bundle(src)[1][golden_sha])))
    golden["out.probs"] = golden["out.probs"] + 0.5
    buf = io.BytesIO()
    np.savez(buf, **golden)
    bad = resign(src, tmp_path / "g.bundle", bundles.keyring, replace_files={"golden": buf.getvalue()})
    assert_refused(armed, lambda: armed.installer.install_file(bad), "smoke_test")


def test_model_that_crashes_the_runtime_on_load(armed: Rig, bundles: Bundles) -> None:
    bad = bundles.build(6, variant="good")
    garbage = resign(bad, bad.parent / "garbage6.bundle", bundles.keyring,
                     replace_files={"model": b"\x08\x07" + b"\xff" * 4096})
    assert_refused(armed, lambda: armed.installer.install_file(garbage), "load")


# -- files and archive -----------------------------------------------------------------

def test_mix_and_match_manifest_and_files(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env6, _ = read_bundle(bundles.build(6, seed=1))
    _, blobs_other = read_bundle(bundles.build(7, seed=2))
    bad = write_raw_bundle(tmp_path / "mix.bundle", env6, blobs_other)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "unsafe_archive", "not listed")


def test_truncated_file(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    sha = _manifest(src, bundles.keyring).files["model"].sha256
    blobs[sha] = blobs[sha][:100]
    bad = write_raw_bundle(tmp_path / "short.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "length")


def test_oversized_file(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    sha = _manifest(src, bundles.keyring).files["model"].sha256
    blobs[sha] = blobs[sha] + b"\0" * (1 << 20)
    bad = write_raw_bundle(tmp_path / "long.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "length")


def test_wrong_length_declared(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    m = _manifest(src, bundles.keyring)
    files = dict(m.files)
    ref = files["model"]
    files["model"] = msgspec.structs.replace(ref, size=ref.size - 10)
    env = sign_manifest(msgspec.structs.replace(m, files=files), bundles.keyring.signing_keys)
    _, blobs = read_bundle(src)
    bad = write_raw_bundle(tmp_path / "len.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "length")


def test_hash_of_another_file(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    m = _manifest(src, bundles.keyring)
    env, blobs = read_bundle(src)
    model_ref, golden_ref = m.files["model"], m.files["golden"]
    # The model's entry names its own hash but the archive holds the golden bytes under it.
    blobs[model_ref.sha256] = blobs[golden_ref.sha256][: model_ref.size].ljust(model_ref.size, b"\0")
    bad = write_raw_bundle(tmp_path / "other.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "hash")


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(lambda: _file_member("../escape", b"x"), id="path-traversal"),
        pytest.param(lambda: _file_member("/etc/passwd", b"x"), id="absolute-path"),
        pytest.param(lambda: _symlink("blobs/sha256/" + "a" * 64, "/etc/passwd"), id="symlink"),
        pytest.param(lambda: _hardlink("blobs/sha256/" + "b" * 64, ENVELOPE_NAME), id="hardlink"),
        pytest.param(lambda: _device("blobs/sha256/" + "c" * 64), id="device-file"),
    ],
)
def test_unsafe_archive_members(armed: Rig, bundles: Bundles, tmp_path: Path, member: Any) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    members = [_file_member(ENVELOPE_NAME, env)]
    data = {ENVELOPE_NAME: env}
    for sha, blob in blobs.items():
        members.append(_file_member(blob_member(sha), blob))
        data[blob_member(sha)] = blob
    evil = member()
    members.insert(1, evil)
    data.setdefault(evil.name, b"x")
    bad = _raw_tar(tmp_path / "evil.bundle", members, data)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "unsafe_archive")
    assert not (tmp_path / "escape").exists() and not (armed.state_dir.parent / "escape").exists()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


def test_duplicate_member(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    members, data = [_file_member(ENVELOPE_NAME, env)], {ENVELOPE_NAME: env}
    for sha, blob in blobs.items():
        members += [_file_member(blob_member(sha), blob)] * 2
        data[blob_member(sha)] = blob
    bad = _raw_tar(tmp_path / "dup.bundle", members, data)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "unsafe_archive", "twice")


def test_listed_file_missing(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    blobs.pop(_manifest(src, bundles.keyring).files["golden"].sha256)
    bad = write_raw_bundle(tmp_path / "missing.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "malformed", "lacks")


def test_unlisted_file_present(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    env, blobs = read_bundle(bundles.build(6))
    extra = b"payload the manifest does not list"
    blobs[hashlib.sha256(extra).hexdigest()] = extra
    bad = write_raw_bundle(tmp_path / "extra.bundle", env, blobs)
    assert_refused(armed, lambda: armed.installer.install_file(bad), "unsafe_archive", "not listed")


def test_decompression_bomb_is_not_a_bundle(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    """Bundles are uncompressed tars: a gzip bomb is refused before anything inflates."""
    import gzip

    bomb = tmp_path / "bomb.bundle"
    with gzip.open(bomb, "wb", compresslevel=9) as gz:
        gz.write(b"\0" * (64 << 20))
    assert bomb.stat().st_size < 1 << 20
    assert_refused(armed, lambda: armed.installer.install_file(bomb), "malformed")


def test_member_header_declaring_huge_size(armed: Rig, bundles: Bundles, tmp_path: Path) -> None:
    src = bundles.build(6)
    env, blobs = read_bundle(src)
    sha = _manifest(src, bundles.keyring).files["model"].sha256
    members, data = [_file_member(ENVELOPE_NAME, env)], {ENVELOPE_NAME: env}
    for s, blob in blobs.items():
        info = _file_member(blob_member(s), blob)
        members.append(info)
        data[blob_member(s)] = blob
    path = _raw_tar(tmp_path / "huge.bundle", members, data)
    # Rewrite the model member's size field in its header to a value far past the manifest's.
    raw = bytearray(path.read_bytes())
    name = blob_member(sha).encode()
    at = raw.find(name)
    raw[at + 124: at + 136] = b"%011o\0" % (8 << 30)
    header = raw[at: at + 512]
    header[148:156] = b" " * 8
    raw[at + 148: at + 156] = b"%06o\0 " % sum(header)
    path.write_bytes(bytes(raw))
    # The header points past the end of the archive: refused as damaged before any extraction.
    assert_refused(armed, lambda: armed.installer.install_file(path), "malformed", "damaged")


# -- device state ----------------------------------------------------------------------

def test_corrupted_state_file_fails_closed(armed: Rig, bundles: Bundles) -> None:
    antirollback = armed.state_dir / "antirollback.json"
    assert antirollback.is_file(), "the anti-rollback state is persisted"
    antirollback.write_bytes(b"{not json")
    with pytest.raises(StateError, match="corrupt"):
        armed.installer.install_file(bundles.build(4))
    assert armed.host.get("clf").release == GOOD_RELEASE


def test_rolled_back_state_file_fails_closed(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    """An attacker restores an older anti-rollback file to make an old release acceptable."""
    rig = make_rig(tmp_path / "state", keyring)
    rig.installer.install_file(bundles.build(3))
    stale = (rig.state_dir / "antirollback.json").read_bytes()
    rig.installer.install_file(bundles.build(GOOD_RELEASE))
    (rig.state_dir / "antirollback.json").write_bytes(stale)
    with pytest.raises((StateError, EdgefleetError)) as info:
        rig.installer.install_file(bundles.build(4))
    assert "rollback" in str(info.value).lower()
    assert rig.host.get("clf").release == GOOD_RELEASE
