"""Seven real exported models from public wheels, each built (quantized where it can be),
installed on the agent's parts (warm-up and smoke test on its golden inputs), served, and
compared with its raw runtime:

- PP-OCRv4 text detector: a vision CNN with dynamic height and width (ONNX, static int8);
- PP-OCRv4 recogniser: OCR, a [batch, time, 6625] class-score output (ONNX, static int8);
- PP-OCR direction classifier: a small CNN classifier (ONNX, static int8);
- silero VAD: a recurrent sequence model with state, control flow and a rank-0 int64 input
  (ONNX, dynamic int8 after --fix-input sr=16000);
- MediaPipe face detector (short range): TFLite with float16 weights, two outputs;
- MediaPipe face mesh landmarks: TFLite float32, two outputs;
- the logistic regression onnxruntime's own wheel ships (onnxruntime/datasets/logreg_iris.onnx,
  converted from scikit-learn, ai.onnx.ml operators only): two outputs of different dtypes
  (``label`` int64, the class probabilities float32), bundled unquantized. Its ``ZipMap``
  (a sequence of maps, which edgefleet refuses by name) is cut off as skl2onnx's
  ``zipmap=False`` does, so the probabilities are the tensor before it.

About 30 s (static quantization calibrates three CNNs), so not a test_*.py file that
``make test`` collects: ``make test-models`` runs it, and .ci/run calls that target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.bundles.build import build_bundle
from fleet.bundles.runners import open_model
from shared.bundle.keyring import Keyring, init_keyring

from .conftest import Device, vad_chunks, vad_stream, voiced_audio

ORT_DATASETS = "onnxruntime_datasets"  # the fixture below: models of the installed onnxruntime wheel

Sample = dict[str, np.ndarray]


def text_image(h: int, w: int, seed: int) -> Sample:
    """Dark strokes on a light page, normalised as PP-OCR expects ([1, 3, h, w], -1..1)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235.0) + rng.normal(0, 6, (h, w, 3))
    for _ in range(rng.integers(3, 8)):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 10)
        img[y:y + rng.integers(3, 8), x:x + rng.integers(4, 20)] = rng.uniform(10, 60)
    return {"x": ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)}


def face_image(name: str, size: int, seed: int) -> Sample:
    """A smooth bright blob on a darker background, [1, size, size, 3] in -1..1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.05)
    img = blob[..., None] * np.array([0.9, 0.7, 0.6]) + rng.normal(0, 0.05, (size, size, 3)) - 0.5
    return {name: (img * 2).clip(-1, 1)[None].astype(np.float32)}


def vad_samples(models: Path, n: int) -> list[Sample]:
    """Chunks of speech-like audio, each with the state the float model carried to it."""
    steps = vad_stream(models / "silero_vad.onnx", vad_chunks(voiced_audio(2.0))[:n * 2])[::2]
    return [{k: s[k] for k in ("input", "state", "sr")} for s in steps]


@dataclass
class Case:
    name: str
    wheel: str  # the fixture that fetches the wheel's models
    file: str
    samples: Callable[[Path, int], list[Sample]]  # (models directory, n) -> n samples (seeded)
    build: dict[str, Any] = field(default_factory=dict)
    max_error: float = 0.05  # against the float model, as the build measured it
    quantized: bool = True
    mode: str = "tflite"  # the manifest's quantization mode when not quantized
    output_dtypes: tuple[str, ...] = ()  # the outputs' dtypes where the case is there for them


def iris_rows(n: int) -> list[Sample]:
    """Three iris-like rows (the model's fixed [3, 2] input), seeded."""
    return [{"float_input": np.random.default_rng(i).normal([5.8, 3.0], 0.8, (3, 2)).astype(np.float32)}
            for i in range(n)]


CASES = [
    Case("ocr-det", "rapidocr_models", "ch_PP-OCRv4_det_infer.onnx",
         lambda _, n: [text_image(64, 64, i) for i in range(n)],
         {"quantization": "static"}, max_error=0.25),
    Case("ocr-rec", "rapidocr_models", "ch_PP-OCRv4_rec_infer.onnx",
         lambda _, n: [text_image(48, 96, i) for i in range(n)],
         {"quantization": "static"}, max_error=0.5),
    Case("ocr-cls", "rapidocr_models", "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         lambda _, n: [text_image(48, 192, i) for i in range(n)],
         {"quantization": "static"}, max_error=0.25),
    Case("vad", "silero_models", "silero_vad.onnx", vad_samples,
         {"quantization": "dynamic", "fixed_inputs": {"sr": "16000"}}),
    Case("face-detect", "mediapipe_face_models", "face_detection_short_range.tflite",
         lambda _, n: [face_image("input", 128, i) for i in range(n)], quantized=False),
    Case("face-mesh", "mediapipe_face_models", "face_landmark.tflite",
         lambda _, n: [face_image("input_1", 192, i) for i in range(n)], quantized=False),
    Case("iris-logreg", ORT_DATASETS, "logreg_iris.onnx", lambda _, n: iris_rows(n),
         quantized=False, mode="none", output_dtypes=("int64", "float32")),
]


@pytest.fixture(scope="module")
def onnxruntime_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """onnxruntime's wheel's logistic regression with its ZipMap cut off (label int64 and the
    normalised probabilities float32 as outputs)."""
    import onnx
    import onnxruntime

    model = onnx.load(Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx")
    graph = model.graph
    (zipmap,) = [n for n in graph.node if n.op_type == "ZipMap"]
    graph.node.remove(zipmap)
    (probabilities,) = [o for o in graph.output if o.name == zipmap.output[0]]
    graph.output.remove(probabilities)
    graph.output.append(onnx.helper.make_tensor_value_info(zipmap.input[0], onnx.TensorProto.FLOAT, [3, 3]))
    onnx.checker.check_model(model)
    out = tmp_path_factory.mktemp("ort-datasets")
    onnx.save(model, out / "logreg_iris.onnx")
    return out


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return init_keyring(tmp_path_factory.mktemp("six") / "keys")


@pytest.fixture
def device(tmp_path: Path, keyring: Keyring) -> Iterator[Device]:
    dev = Device(tmp_path / "state", keyring.root_path.parent)
    yield dev
    dev.host.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_real_model_builds_installs_serves_and_matches_its_runtime(
    case: Case, request: pytest.FixtureRequest, keyring: Keyring, device: Device, tmp_path: Path
) -> None:
    models: Path = request.getfixturevalue(case.wheel)
    model = models / case.file
    calibration, validation = case.samples(models, 3), case.samples(models, 5)[3:]
    extra = dict(case.build)
    if extra.get("quantization") == "static":
        extra["calibration"] = calibration
    vm = build_bundle(model, name=case.name, version="1", release=1, keyring=keyring,
                      out=tmp_path / "m.bundle", validation=validation, max_error=case.max_error,
                      **extra)
    q = vm.manifest.quantization
    if case.output_dtypes:
        assert tuple(o.dtype for o in vm.manifest.outputs) == case.output_dtypes
    if case.quantized:
        assert q.weight_dtype == "int8" and q.agreement["rel_l2_error"] <= case.max_error
        assert q.agreement["size_ratio"] < 0.6
        for out in vm.manifest.outputs:  # every output's figures are in the manifest
            assert f"output.{out.name}.rel_l2_error" in q.agreement
    else:
        assert q.mode == case.mode

    device.installer.install_file(tmp_path / "m.bundle")
    loaded = device.host.get(case.name)
    assert loaded is not None and loaded.digest == vm.digest
    bundled = open_model(device.model_file(case.name))
    for feed in validation + case.samples(models, 6)[5:]:
        _, served = device.host.predict(case.name, feed)
        raw = bundled.run(feed)
        for spec, want in zip(vm.manifest.outputs, raw, strict=True):
            got = served[spec.name]
            assert got.shape == want.shape and got.dtype == want.dtype, spec.name
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{case.name} {spec.name}")
