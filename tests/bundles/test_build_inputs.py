"""What the build takes and refuses: samples files, inputs it cannot invent, already-int8
models, and an accuracy bound that catches a collapse hidden by large values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleet.bundles.build import build_bundle
from fleet.bundles.quantize import AccuracyBoundError, QuantizationError, split_samples
from shared.bundle.keyring import Keyring, init_keyring
from shared.bundle.manifest import TensorSpec
from shared.errors import MalformedDocumentError

VAD_INPUTS = [
    TensorSpec(name="input", dtype="float32", shape=["batch", "samples"]),
    TensorSpec(name="state", dtype="float32", shape=[2, "batch", 128]),
    TensorSpec(name="sr", dtype="int64", shape=[]),
]
IMAGE_INPUTS = [TensorSpec(name="x", dtype="float32", shape=["batch", 3, 8, 8])]


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return init_keyring(tmp_path_factory.mktemp("keys"))


def test_one_feed_at_the_models_own_ranks_is_one_sample() -> None:
    feed = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64)}
    samples = split_samples(feed, VAD_INPUTS, "validation")
    assert len(samples) == 1
    assert {k: v.shape for k, v in samples[0].items()} == {"input": (1, 576), "state": (2, 1, 128), "sr": ()}


def test_stacked_feeds_and_batch_rows_keep_working() -> None:
    stacked = {"input": np.zeros((5, 1, 576), np.float32), "state": np.zeros((5, 2, 1, 128), np.float32),
               "sr": np.full(5, 16000, np.int64)}
    samples = split_samples(stacked, VAD_INPUTS, "validation")
    assert len(samples) == 5 and samples[3]["state"].shape == (2, 1, 128) and samples[3]["sr"].shape == ()
    rows = split_samples({"x": np.zeros((4, 3, 8, 8), np.float32)}, IMAGE_INPUTS, "calibration")
    assert len(rows) == 4 and rows[0]["x"].shape == (1, 3, 8, 8)


def test_a_mix_of_ranks_is_refused_naming_each_input() -> None:
    mixed = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((5, 2, 1, 128), np.float32),
             "sr": np.array(16000, np.int64)}
    with pytest.raises(MalformedDocumentError, match=r"state: array rank 4, input rank 3"):
        split_samples(mixed, VAD_INPUTS, "validation")


def test_inputs_the_signature_cannot_make_name_the_flag(
    silero_models: Path, keyring: Keyring, tmp_path: Path
) -> None:
    with pytest.raises(MalformedDocumentError, match=r"made from its signature .*--golden"):
        build_bundle(silero_models / "silero_vad.onnx", name="vad", version="1", release=1,
                     keyring=keyring, out=tmp_path / "vad.bundle")
    assert not (tmp_path / "vad.bundle").exists()


def test_fixed_input_samples_must_hold_the_fixed_value(
    silero_models: Path, keyring: Keyring, tmp_path: Path
) -> None:
    feed = {"input": np.zeros((1, 576), np.float32), "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(8000, np.int64)}
    with pytest.raises(MalformedDocumentError, match=r"'sr' is 8000 but the build fixes it to 16000"):
        build_bundle(silero_models / "silero_vad.onnx", name="vad", version="1", release=1,
                     keyring=keyring, out=tmp_path / "vad.bundle", golden_inputs=feed,
                     fixed_inputs={"sr": "16000"})


def write_matmul_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_dynamic_on_an_already_int8_model_says_so(keyring: Keyring, tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    write_matmul_model(tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    with pytest.raises(QuantizationError, match=r"already quantized: it holds 2 int8/uint8 weight") as err:
        build_bundle(tmp_path / "q.onnx", name="mm", version="1", release=1, keyring=keyring,
                     out=tmp_path / "q.bundle", quantization="dynamic")
    assert err.value.details["int8_weights"] == 2  # the weight and its zero point
    vm = build_bundle(tmp_path / "q.onnx", name="mm", version="1", release=1, keyring=keyring,
                      out=tmp_path / "q.bundle")
    assert vm.manifest.quantization.mode == "none"


def write_detector(path: Path) -> None:
    """A detector head: [batch, 64 anchors, 22] = 4 box coordinates in pixels (0..640) and
    18 class scores (0..1) on the same axis, the layout of issue 21's YOLO-style model."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 22)) * 0.5).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Slice", ["h", "s0", "s4", "ax"], ["box_raw"]),
            helper.make_node("Slice", ["h", "s4", "s22", "ax"], ["cls_raw"]),
            helper.make_node("Sigmoid", ["box_raw"], ["box_unit"]),
            helper.make_node("Mul", ["box_unit", "scale"], ["box"]),
            helper.make_node("Sigmoid", ["cls_raw"], ["cls"]),
            helper.make_node("Concat", ["box", "cls"], ["det"], axis=2),
        ],
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 16])],
        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["batch", 64, 22])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([640.0], np.float32), "scale"),
         numpy_helper.from_array(np.array([0], np.int64), "s0"),
         numpy_helper.from_array(np.array([4], np.int64), "s4"),
         numpy_helper.from_array(np.array([22], np.int64), "s22"),
         numpy_helper.from_array(np.array([2], np.int64), "ax")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_collapse_of_class_scores_beside_coordinates_is_refused_with_its_figures(
    keyring: Keyring, tmp_path: Path
) -> None:
    write_detector(tmp_path / "det.onnx")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 64, 16)).astype(np.float32)} for _ in range(8)]
    with pytest.raises(AccuracyBoundError) as err:
        build_bundle(tmp_path / "det.onnx", name="det", version="1", release=1, keyring=keyring,
                     out=tmp_path / "det.bundle", quantization="static", calibration=samples,
                     validation=samples)
    message = str(err.value)
    assert "in output 'det', channel" in message and "along axis 2" in message
    worst = err.value.details["per_output"]["det"]  # type: ignore[index]
    assert 4 <= worst["worst_channel"] < 22  # a class score, not a coordinate
    assert worst["rel_l2_error"] > 0.5
    # measured over the whole tensor, as before, the coordinates hide it: under the 0.05 bound
    assert worst["tensor_rel_l2_error"] < 0.05
    assert not (tmp_path / "det.bundle").exists()


def test_top1_agreement_over_the_class_channels_the_build_is_told(keyring: Keyring, tmp_path: Path) -> None:
    write_detector(tmp_path / "det.onnx")
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((1, 64, 16)).astype(np.float32)} for _ in range(8)]
    with pytest.raises(AccuracyBoundError, match=r"agrees on the top class for \d+\.\d+% of outputs, below"
                       ) as err:
        build_bundle(tmp_path / "det.onnx", name="det", version="1", release=1, keyring=keyring,
                     out=tmp_path / "det.bundle", quantization="static", calibration=samples,
                     validation=samples, max_error=10.0, class_scores="det:2:4", min_argmax_agreement=0.9)
    assert err.value.details["argmax_agreement"] < 0.5  # type: ignore[operator]
    unknown = r"OUTPUT\[:AXIS\[:FIRST\]\] with OUTPUT one of \['det'\]"
    with pytest.raises(MalformedDocumentError, match=unknown):
        build_bundle(tmp_path / "det.onnx", name="det", version="1", release=1, keyring=keyring,
                     out=tmp_path / "det.bundle", quantization="static", calibration=samples,
                     class_scores="scores:2")


def test_cli_flags_reach_the_build(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(repo)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleet.cli.main", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)

    assert cli("keys", "init", str(tmp_path / "keys")).returncode == 0
    write_detector(tmp_path / "det.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((8, 1, 64, 16)).astype(np.float32))
    done = cli("bundle", "build", str(tmp_path / "det.onnx"), "--name", "det", "--version", "1", "--offline",
               "--quantize", "static", "--calibration", str(tmp_path / "cal.npz"), "--max-error", "10",
               "--class-scores", "det:2:4", "--min-argmax-agreement", "0.9",
               "--keys", str(tmp_path / "keys"), "-o", str(tmp_path / "det.bundle"))
    assert done.returncode != 0 and "agrees on the top class" in done.stderr, done.stderr
    assert "\n" not in done.stderr.strip()  # one line
