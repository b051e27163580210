"""TFLite models are taken as converted: the build reads their signature (dynamic batch
axis included) and records the quantization their weight dtypes show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.bundles.build import build_bundle
from fleet.demo.models import write_tflite_classifier
from shared.bundle.archive import read_envelope
from shared.bundle.keyring import init_keyring
from shared.errors import MalformedDocumentError

pytest.importorskip("ai_edge_litert", reason="LiteRT is not installed: pip install ai-edge-litert")


@pytest.mark.parametrize(("int8", "dtype"), [(False, "float32"), (True, "int8")])
def test_tflite_signature_and_quantization(tmp_path: Path, int8: bool, dtype: str) -> None:
    keys = init_keyring(tmp_path / "keys")
    model = tmp_path / "m.tflite"
    write_tflite_classifier(model, int8_weights=int8)
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    vm = build_bundle(model, name="tfl", version="1", release=1, keyring=keys, out=tmp_path / "b.bundle",
                      golden_inputs={"x": x})
    m = vm.manifest
    assert m.runtime == "litert"
    assert m.quantization.mode == "tflite" and m.quantization.weight_dtype == dtype
    assert m.inputs[0].name == "x" and m.inputs[0].dtype == "float32"
    assert isinstance(m.inputs[0].shape[0], str) and m.inputs[0].shape[1] == 4
    assert m.files["model"].media_type == "application/vnd.tflite"
    assert keys.trust_root().verify_manifest(read_envelope(tmp_path / "b.bundle")).digest == vm.digest


def test_tflite_cannot_be_requantized(tmp_path: Path) -> None:
    keys = init_keyring(tmp_path / "keys")
    write_tflite_classifier(tmp_path / "m.tflite")
    with pytest.raises(MalformedDocumentError, match="taken as converted"):
        build_bundle(tmp_path / "m.tflite", name="tfl", version="1", release=1, keyring=keys,
                     out=tmp_path / "b.bundle", quantization="dynamic")
