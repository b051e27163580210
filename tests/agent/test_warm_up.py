"""The warm-up of every load runs the bundle's own golden inputs (the golden blob beside the
model blob), never inputs made up from the signature."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.errors import LoadError
from agent.runtime.onnx_backend import OnnxBackend
from shared.bundle.manifest import Manifest

from .conftest import Bundles, Rig, verified


def _blobs(rig: Rig, bundles: Bundles, tmp_path: Path) -> tuple[Path, Path, Manifest]:
    """The installed bundle's model and golden blobs copied into a directory of their own."""
    path = bundles.build(1)
    rig.installer.install_file(path)
    manifest = verified(path, bundles.keyring).manifest
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for role in ("model", "golden"):
        sha = manifest.files[role].sha256
        shutil.copy(rig.installer.blobs.path(sha), blobs / sha)
    return blobs / manifest.files["model"].sha256, blobs / manifest.files["golden"].sha256, manifest


def test_warm_up_runs_the_golden_inputs_and_keeps_them_for_the_probe(
    rig: Rig, bundles: Bundles, tmp_path: Path
) -> None:
    model, golden, manifest = _blobs(rig, bundles, tmp_path)
    session = OnnxBackend().load(model, manifest)
    with np.load(golden) as data:
        assert session.golden is not None
        np.testing.assert_array_equal(session.golden["x"], data["in.x"])


def test_a_damaged_golden_blob_refuses_the_load_by_name(rig: Rig, bundles: Bundles, tmp_path: Path) -> None:
    model, golden, manifest = _blobs(rig, bundles, tmp_path)
    golden.write_bytes(b"not a zip")
    with pytest.raises(LoadError, match=r"clf r1: its golden inputs cannot be read for the warm-up"):
        OnnxBackend().load(model, manifest)


def test_without_its_golden_blob_beside_it_nothing_is_made_up(
    rig: Rig, bundles: Bundles, tmp_path: Path
) -> None:
    model, golden, manifest = _blobs(rig, bundles, tmp_path)
    golden.unlink()
    session = OnnxBackend().load(model, manifest)
    assert session.golden is None  # loaded without a warm-up; the smoke test still runs golden
