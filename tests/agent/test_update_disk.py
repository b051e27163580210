"""A full disk: refused before the download when the space is known to be short, and a
clean FAILED/disk_full when the disk fills up mid-download. The old model keeps serving."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from agent.update.lifecycle import Target, UpdateState
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs
from shared.bundle.envelope import Envelope
from shared.bundle.keyring import Keyring, sign_manifest
from shared.bundle.manifest import MAX_FILE_BYTES, FileRef, payload_digest

from .conftest import Bundles, Rig, make_rig, read_bundle, verified
from .test_update_fetch import RangeFleet, fetcher, running_fleet, write_padded_classifier

S = UpdateState
X = golden_inputs(batch=2, seed=7)["x"]


@pytest.fixture
def range_fleet() -> Iterator[RangeFleet]:
    yield from running_fleet()


def target(fleet: RangeFleet, entry: dict[str, Any]) -> Target:
    return Target(entry["release"], entry["digest"], fleet.url + entry["envelope_url"],
                  fleet.url + entry["blob_url"])


def model_sha(bundle: Path, keyring: Keyring) -> str:
    return verified(bundle, keyring).manifest.files["model"].sha256


def padded_bundle(directory: Path, keyring: Keyring, release: int, pad: int) -> Path:
    model = write_padded_classifier(directory / f"pad-{release}.onnx", seed=release, pad_bytes=pad)
    out = directory / f"pad-r{release}.bundle"
    build_bundle(model, name="clf", version=f"1.{release}", release=release, keyring=keyring, out=out,
                 golden_inputs=golden_inputs())
    return out


def assert_old_serves(rig: Rig, state_dir: Path) -> None:
    loaded = rig.host.get("clf")
    assert loaded is not None and loaded.release == 1
    assert rig.predict(X)["probs"].shape == (2, 3)
    assert list((state_dir / "staging").iterdir()) == [], "partial files are removed"


def test_precheck_refuses_a_huge_release_before_any_blob_byte(
    tmp_path: Path, keyring: Keyring, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    # A validly signed release that declares a 16 GiB model.
    env, blobs = read_bundle(bundles.build(2, seed=1))
    manifest = keyring.trust_root().verify_manifest(env).manifest
    files = dict(manifest.files)
    files["model"] = FileRef(files["model"].sha256, MAX_FILE_BYTES, files["model"].media_type)
    env = sign_manifest(msgspec.structs.replace(manifest, files=files), keyring.signing_keys)
    range_fleet.envelopes[2] = env
    range_fleet.blobs.update(blobs)
    entry = {"release": 2, "digest": payload_digest(Envelope.from_json(env).payload),
             "envelope_url": "/api/v1/bundles/2/envelope", "blob_url": "/api/v1/blobs/{sha256}"}
    # Whatever this machine has free, leave it less than 16 GiB to stage into.
    margin = max(0, shutil.disk_usage(tmp_path).free - (4 << 30))
    now = [1000.0]
    rig = make_rig(tmp_path / "s", keyring, fetcher=fetcher(), disk_margin_bytes=margin,
                   clock=lambda: now[0], retry_failed_s=60)
    rig.installer.install_file(bundles.build(1))

    rec = rig.installer.apply_target("clf", target(range_fleet, entry))
    assert rec.state == S.FAILED and rec.reason == "disk_full" and rec.attempts == 1
    m = re.search(r"the 2 missing file\(s\) need (\d+) bytes plus a margin of (\d+)", rec.message)
    assert m is not None and int(m.group(1)) > MAX_FILE_BYTES and int(m.group(2)) == margin
    assert rec.active is not None and rec.active.release == 1
    assert_old_serves(rig, tmp_path / "s")
    assert not any("/blobs/" in s.path for s in range_fleet.served), "refused before any blob request"
    assert rig.events[-1][1] == "failed" and rig.events[-1][4] == "disk_full"

    # Retryable, but not at every poll: the next try waits retry_failed_s, then doubles.
    n = len(range_fleet.served)
    assert rig.installer.apply_target("clf", target(range_fleet, entry)).attempts == 1
    assert len(range_fleet.served) == n
    now[0] += 61
    rec = rig.installer.apply_target("clf", target(range_fleet, entry))
    assert rec.reason == "disk_full" and rec.attempts == 2 and rig.installer.retry_pause(rec) == 120


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB filesystem (tmpfs) for state_dir."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the pre-check test still runs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_filling_up_mid_download_on_a_real_small_filesystem(
    small_fs: Path, tmp_path: Path, keyring: Keyring, bundles: Bundles, range_fleet: RangeFleet
) -> None:
    state = small_fs / "state"
    now = [1000.0]
    rig = make_rig(state, keyring, fetcher=fetcher(), disk_margin_bytes=0, clock=lambda: now[0],
                   retry_failed_s=30)
    rig.installer.install_file(bundles.build(1))
    r2 = padded_bundle(tmp_path, keyring, 2, pad=1 << 20)
    sha2 = model_sha(r2, keyring)
    filler = small_fs / "filler"
    filled: list[int] = []

    def fill_up(sha: str) -> None:
        # Another process takes the space once the pre-check has passed (once).
        if sha == sha2 and not filled:
            filled.append(1)
            st = os.statvfs(small_fs)
            with open(filler, "wb") as fh:
                fh.write(b"\0" * (st.f_bavail * st.f_frsize - 200_000))

    range_fleet.faults.on_blob = fill_up
    entry = range_fleet.publish(2, r2)
    rec = rig.installer.apply_target("clf", target(range_fleet, entry))
    assert rec.state == S.FAILED and rec.reason == "disk_full", rec.message
    assert "no space left" in rec.message
    assert_old_serves(rig, state)
    assert not (state / "blobs" / "sha256" / sha2).exists()
    served = range_fleet.blob_requests(sha2)
    assert len(served) == 1 and served[0].sent > 0, "the disk filled up mid-body"

    # Space comes back: after the retry pause the same release installs.
    filler.unlink()
    now[0] += 31
    rec = rig.installer.apply_target("clf", target(range_fleet, entry))
    assert rec.state == S.TRIAL and rec.active is not None and rec.active.release == 2
    assert rig.host.get("clf").release == 2  # type: ignore[union-attr]

    # A release larger than the whole filesystem: refused by the pre-check, real free space.
    r3 = padded_bundle(tmp_path, keyring, 3, pad=4 << 20)
    rig.installer.check_trials()
    entry = range_fleet.publish(3, r3)
    rec = rig.installer.apply_target("clf", target(range_fleet, entry))
    assert rec.state == S.FAILED and rec.reason == "disk_full"
    assert "bytes free" in rec.message
    assert range_fleet.blob_requests(model_sha(r3, keyring)) == []
    assert rig.host.get("clf").release == 2  # type: ignore[union-attr]
    out: Callable[..., Any] = rig.predict
    assert np.allclose(out(X)["probs"].sum(axis=1), 1.0, atol=1e-5)
