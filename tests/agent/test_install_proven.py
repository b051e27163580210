"""An offline install hashes each file once: proven while placed, not re-hashed in VERIFYING.

extract_blobs hashes every blob whole on the bytes it writes and places it only if that
matched; the machine's BlobsPlaced carries those sha256s to RECHECK, which then only checks
that they are still there. Anything not proven in this process (a restart in VERIFYING) is
hashed again, and a tampered or truncated bundle is still refused. Real signed bundles.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from agent.update import runner
from agent.update.blobs import BlobStore
from agent.update.lifecycle import UpdateState
from shared.bundle.keyring import Keyring
from shared.errors import EdgefleetError, HashMismatchError

from .conftest import Bundles, make_rig, read_bundle, verified, write_raw_bundle

S = UpdateState
CHUNKED = {"chunk_size": 64 * 1024, "chunk_min_bytes": 0}


@pytest.fixture
def rehashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sha256 of every placed blob BlobStore.verify_placed re-hashes, in order."""
    calls: list[str] = []
    real = BlobStore.verify_placed

    def counted(self: BlobStore, ref: object) -> bool:
        calls.append(ref.sha256)  # type: ignore[attr-defined]
        return real(self, ref)  # type: ignore[arg-type]

    monkeypatch.setattr(BlobStore, "verify_placed", counted)
    return calls


def _placed_hash_right(state: Path) -> None:
    for blob in (state / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("chunked", [True, False])
def test_offline_install_does_not_hash_a_placed_file_twice(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, rehashed: list[str], chunked: bool
) -> None:
    bundle = bundles.build(1, **(CHUNKED if chunked else {}))
    vm = verified(bundle, keyring)
    assert bool(vm.manifest.files["model"].chunks) == chunked  # the other files: whole
    rig = make_rig(tmp_path / "s", keyring)
    rec = rig.installer.install_file(bundle)
    assert rec.state == S.COMMITTED and rig.host.get("clf").release == 1  # type: ignore[union-attr]
    assert rehashed == []
    _placed_hash_right(tmp_path / "s")


def test_a_placed_file_that_vanished_before_verifying_is_not_taken_on_trust(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proven means hashed while written AND still there at its size when VERIFYING runs."""
    bundle = bundles.build(1, **CHUNKED)
    model = verified(bundle, keyring).manifest.files["model"].sha256
    state = tmp_path / "s"

    def cut_model(step: str) -> None:
        if step == "verifying" and not cuts:
            cuts.append(step)
            (state / "blobs" / "sha256" / model).unlink()

    cuts: list[str] = []

    monkeypatch.setattr(runner, "pause_point", cut_model)
    rig = make_rig(state, keyring)
    rec = rig.installer.install_file(bundle)  # damaged once: extracted again, then committed
    assert rec.state == S.COMMITTED
    assert "download_started" in rig.kinds()[1:]
    _placed_hash_right(state)


def test_tampered_chunked_bundle_is_refused_naming_the_chunk(
    tmp_path: Path, keyring: Keyring, bundles: Bundles
) -> None:
    rig = make_rig(tmp_path / "s", keyring)
    rig.installer.install_file(bundles.build(1))
    bundle = bundles.build(2, seed=1, **CHUNKED)
    env, blobs = read_bundle(bundle)
    ref = verified(bundle, keyring).manifest.files["model"]
    data = bytearray(blobs[ref.sha256])
    data[-10] ^= 0xFF
    blobs[ref.sha256] = bytes(data)
    last = len(ref.chunks or []) - 1
    with pytest.raises(HashMismatchError, match=rf"of 'model' .* chunk {last} does not match"):
        rig.installer.install_file(write_raw_bundle(tmp_path / "t.bundle", env, blobs))
    rec = rig.installer.store.load("clf")
    assert rec is not None and rec.state == S.FAILED and rec.reason == "hash"
    assert rig.host.get("clf").release == 1  # type: ignore[union-attr]
    assert ref.sha256 not in {p.name for p in (tmp_path / "s" / "blobs" / "sha256").iterdir()}
    assert list((tmp_path / "s" / "staging").iterdir()) == []


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_chunked_bundle_is_refused(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, keep: float
) -> None:
    """Cut inside the model's bytes (its first, middle, last chunk): refused, nothing placed."""
    rig = make_rig(tmp_path / "s", keyring)
    rig.installer.install_file(bundles.build(1))
    bundle = bundles.build(2, seed=1, **CHUNKED)
    ref = verified(bundle, keyring).manifest.files["model"]
    with tarfile.open(bundle) as tar:
        start = tar.getmember(f"blobs/sha256/{ref.sha256}").offset_data
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(bundle.read_bytes()[:start + int(ref.size * keep)])
    with pytest.raises(EdgefleetError):
        rig.installer.install_file(cut)
    assert rig.host.get("clf").release == 1  # type: ignore[union-attr]
    assert rig.installer.store.load("clf").active.release == 1  # type: ignore[union-attr]
    assert ref.sha256 not in {p.name for p in (tmp_path / "s" / "blobs" / "sha256").iterdir()}
    _placed_hash_right(tmp_path / "s")


class _Cut(BaseException):
    """A power cut: nothing after it runs, nothing catches it."""


def test_after_a_cut_in_verifying_every_file_is_hashed_again(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, monkeypatch: pytest.MonkeyPatch,
    rehashed: list[str],
) -> None:
    """The proven set lives in memory only: the next start re-hashes every placed file, finds
    the one damaged meanwhile, extracts it again (proven this time) and commits."""
    state = tmp_path / "s"
    rig = make_rig(state, keyring)
    rig.installer.install_file(bundles.build(1))
    bundle = bundles.build(2, seed=1, **CHUNKED)
    files = verified(bundle, keyring).manifest.files

    def cut(step: str) -> None:
        if step == "verifying":
            raise _Cut

    monkeypatch.setattr(runner, "pause_point", cut)
    with pytest.raises(_Cut):
        rig.installer.install_file(bundle)
    monkeypatch.setattr(runner, "pause_point", lambda _step: None)
    assert rig.installer.store.load("clf").state == S.VERIFYING  # type: ignore[union-attr]
    model = state / "blobs" / "sha256" / files["model"].sha256
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))

    rehashed.clear()
    fresh = make_rig(state, keyring)
    assert fresh.installer.recover() == ["clf"]
    done = fresh.installer.resume("clf")
    assert done is not None and done.state == S.COMMITTED
    assert fresh.host.get("clf").release == 2  # type: ignore[union-attr]
    # once each, at the restart's RECHECK; the second RECHECK (after extracting again) none
    assert sorted(rehashed) == sorted(ref.sha256 for ref in files.values())
    assert fresh.kinds()[0] == "download_started"
    _placed_hash_right(state)
