"""What the build takes and refuses: samples files, inputs it cannot invent, already-int8
models and models int8 does not apply to, and an accuracy bound that catches a collapse
hidden by large values (per channel, top-1 agreement, detections kept)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleet.bundles.build import build_bundle
from fleet.bundles.quantize import (
    AccuracyBoundError,
    ClassScores,
    Detections,
    QuantizationError,
    check_bound,
    compare,
    split_samples,
)
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


def write_detector(path: Path, *, score_gain: float = 1.0, weight_noise: float = 0.0) -> None:
    """A detector head: [batch, 64 anchors, 22] = 4 box coordinates in pixels (0..640) and
    18 class scores (0..1) on the same axis, the layout of issue 21's YOLO-style model.
    A candidate standing in for a quantized model: ``score_gain`` scales the class scores
    (0: the collapse issue 21 saw), ``weight_noise`` perturbs the weights (int8 rounding)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 22)) * 0.5).astype(np.float32)
    w += (np.random.default_rng(9).standard_normal(w.shape) * weight_noise).astype(np.float32)
    scores = [helper.make_node("Sigmoid", ["cls_raw"], ["cls"])]
    gain: list[onnx.TensorProto] = []
    if score_gain != 1.0:
        scores = [helper.make_node("Sigmoid", ["cls_raw"], ["cls_unit"]),
                  helper.make_node("Mul", ["cls_unit", "gain"], ["cls"])]
        gain = [numpy_helper.from_array(np.array([score_gain], np.float32), "gain")]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Slice", ["h", "s0", "s4", "ax"], ["box_raw"]),
            helper.make_node("Slice", ["h", "s4", "s22", "ax"], ["cls_raw"]),
            helper.make_node("Sigmoid", ["box_raw"], ["box_unit"]),
            helper.make_node("Mul", ["box_unit", "scale"], ["box"]),
            *scores,
            helper.make_node("Concat", ["box", "cls"], ["det"], axis=2),
        ],
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 16])],
        [helper.make_tensor_value_info("det", TensorProto.FLOAT, ["batch", 64, 22])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([640.0], np.float32), "scale"),
         *gain,
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


DETECTIONS = Detections(output=0, axis=2, first=4, threshold=0.25)


def detector_samples(n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 64, 16)).astype(np.float32)} for _ in range(n)]


def test_a_candidate_whose_scores_collapse_keeps_no_detection_and_is_refused(tmp_path: Path) -> None:
    """Issue 21's detector: every class score of the int8 model exactly 0 while the boxes
    hold, so the whole tensor's error is small; none of the float model's detections is
    kept, and that alone refuses it, with the figures."""
    write_detector(tmp_path / "float.onnx")
    write_detector(tmp_path / "collapsed.onnx", score_gain=0.0)
    samples = detector_samples()
    agreement = compare(tmp_path / "float.onnx", tmp_path / "collapsed.onnx", samples,
                        class_scores=ClassScores(0, 2, 4), detections=[DETECTIONS])
    det = agreement.per_output["det"]
    assert det.tensor_rel_l2_error < 0.05  # the old whole-tensor bound let it through
    assert det.detections == 512 and det.detections_kept == 0.0 and det.detections_extra == 0
    assert det.detection_threshold == 0.25 and agreement.detections_kept == 0.0
    with pytest.raises(AccuracyBoundError) as err:
        check_bound(agreement, max_error=10.0)  # the per-channel bound out of the way: 0.9 by default
    message = str(err.value)
    assert message.startswith(
        "quantized model keeps 0.00% of the float model's detections in output 'det', below the "
        "bound 90.00% by 90.00% (0 of 512 anchors whose best class score is >= 0.25 in the float "
        "model stay so with the same top class; 0 new ones; that output's worst-channel error 1.0000, "
        "whole-tensor error 0.00"), message
    assert message.endswith("8 samples); add calibration data, use another quantization mode, or "
                            "loosen the bound (lower --min-detections-kept)")
    assert err.value.details["detections_kept"] == 0.0
    per_output = err.value.details["per_output"]["det"]  # type: ignore[index]
    assert per_output["detections"] == 512.0 and per_output["detections_kept"] == 0.0
    # with the default bounds both the worst channel and the detections say it, in one message
    with pytest.raises(AccuracyBoundError) as both:
        check_bound(agreement, max_error=0.05)
    assert "relative error 1.0000 exceeds the bound 0.0500" in str(both.value)
    assert "keeps 0.00% of the float model's detections" in str(both.value)
    assert str(both.value).endswith("(raise --max-error, lower --min-detections-kept)")


def test_a_candidate_that_keeps_its_detections_passes_with_the_figures_recorded(tmp_path: Path) -> None:
    write_detector(tmp_path / "float.onnx")
    write_detector(tmp_path / "close.onnx", weight_noise=0.01)
    agreement = compare(tmp_path / "float.onnx", tmp_path / "close.onnx", detector_samples(),
                        detections=[DETECTIONS])
    det = agreement.per_output["det"]
    assert det.detections == 512 and 0.9 <= det.detections_kept < 1.0  # type: ignore[operator]
    check_bound(agreement, max_error=0.05)  # passes
    assert {"detection_threshold", "detections", "detections_kept", "detections_extra"} <= set(
        det.as_manifest())
    with pytest.raises(AccuracyBoundError, match=r"keeps 9\d\.\d\d% of the float model's detections"):
        check_bound(agreement, max_error=0.05, min_detections_kept=1.0)
    # outputs without a detection layout record no detection figures
    plain = compare(tmp_path / "float.onnx", tmp_path / "close.onnx", detector_samples(2))
    assert "detections" not in plain.per_output["det"].as_manifest() and plain.detections_kept is None


def test_the_build_measures_detections_kept_and_refuses_static_int8_that_drops_them(
    keyring: Keyring, tmp_path: Path
) -> None:
    write_detector(tmp_path / "det.onnx")
    samples = detector_samples()
    common = dict(name="det", version="1", release=1, keyring=keyring, out=tmp_path / "det.bundle",
                  calibration=samples, validation=samples)
    # static int8 sets every class score to 0 here: refused on detections alone
    with pytest.raises(AccuracyBoundError, match=r"keeps 0\.00% of the float model's detections in "
                       r"output 'det', below the bound 90\.00%"):
        build_bundle(tmp_path / "det.onnx", quantization="static", max_error=10.0,
                     detections=["det:2:4:0.5"], **common)  # type: ignore[arg-type]
    assert not (tmp_path / "det.bundle").exists()
    # dynamic int8 keeps them; the manifest records the figures per output and the worst
    vm = build_bundle(tmp_path / "det.onnx", quantization="dynamic", detections=["det:2:4:0.5"],
                      **common)  # type: ignore[arg-type]
    figures = vm.manifest.quantization.agreement
    assert figures["output.det.detections"] == 512 and figures["output.det.detection_threshold"] == 0.5
    assert figures["output.det.detections_kept"] >= 0.99 and figures["detections_kept"] >= 0.99
    # the detection layout is the top-1 layout too: the class channels, not the coordinates
    assert figures["argmax_agreement"] >= 0.99
    # a threshold the float model never reaches measures nothing: said, not passed
    with pytest.raises(QuantizationError, match=r"makes no detection in output 'det' over the 8 "
                       r"validation samples \(no best class score >= 2\)"):
        build_bundle(tmp_path / "det.onnx", quantization="dynamic", detections=["det:2:4:2"],
                     **common)  # type: ignore[arg-type]


@pytest.mark.parametrize(("flag", "match"), [
    ("boxes:2:4", r"must read OUTPUT\[:AXIS\[:FIRST\[:THRESHOLD\]\]\] with OUTPUT one of \['det'\]"),
    ("det:2:22", r"output 'det' has rank 3 \(shape \['batch', 64, 22\]\); axis 2 / first class 22 do not "
                 "fit"),
    ("det:3", r"axis 3 / first class 0 do not fit"),
    ("det:2:4:high", r"THRESHOLD is a number"),
    ("det:2:4:0.5:1", r"must read OUTPUT\[:AXIS\[:FIRST\[:THRESHOLD\]\]\]"),
])
def test_a_detection_layout_that_does_not_fit_is_refused(
    flag: str, match: str, keyring: Keyring, tmp_path: Path
) -> None:
    write_detector(tmp_path / "det.onnx")
    with pytest.raises(MalformedDocumentError, match=match):
        build_bundle(tmp_path / "det.onnx", name="det", version="1", release=1, keyring=keyring,
                     out=tmp_path / "det.bundle", quantization="dynamic", detections=[flag])


def test_one_detection_layout_per_output(keyring: Keyring, tmp_path: Path) -> None:
    write_detector(tmp_path / "det.onnx")
    with pytest.raises(MalformedDocumentError, match=r"names output\(s\) \['det'\] more than once"):
        build_bundle(tmp_path / "det.onnx", name="det", version="1", release=1, keyring=keyring,
                     out=tmp_path / "det.bundle", quantization="dynamic",
                     detections=["det:2:4", "det:2:4:0.5"])


def scikit_learn_logreg(path: Path) -> None:
    """onnxruntime's wheel's scikit-learn logistic regression (skl2onnx: ai.onnx.ml operators
    only, no ai.onnx opset) with its ZipMap cut off, as the real-model tests use it."""
    import onnxruntime

    model = onnx.load(str(Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"))
    (zipmap,) = [n for n in model.graph.node if n.op_type == "ZipMap"]
    model.graph.node.remove(zipmap)
    (probabilities,) = [o for o in model.graph.output if o.name == zipmap.output[0]]
    model.graph.output.remove(probabilities)
    model.graph.output.append(helper.make_tensor_value_info(zipmap.input[0], TensorProto.FLOAT, [3, 3]))
    onnx.save(model, str(path))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_on_a_scikit_learn_model_says_it_does_not_apply_and_why(
    mode: str, keyring: Keyring, tmp_path: Path
) -> None:
    # before: "the model uses opset 0; converting it to 13 failed: ... invalid version"
    scikit_learn_logreg(tmp_path / "logreg.onnx")
    rows = [{"float_input": np.random.default_rng(i).random((3, 2), np.float32)} for i in range(3)]
    with pytest.raises(QuantizationError) as err:
        build_bundle(tmp_path / "logreg.onnx", name="iris", version="1", release=1, keyring=keyring,
                     out=tmp_path / "iris.bundle", quantization=mode, calibration=rows, validation=rows)
    message = str(err.value)
    assert message.startswith(f"int8 does not apply to this model: {mode} int8 quantizes the weights of "
                              "the standard ONNX operators "), message
    assert "its operators are ai.onnx.ml: LinearClassifier, Normalizer (traditional machine" in message
    assert "coefficients are attributes" in message and message.endswith("with --quantize none")
    assert "opset 0" not in message and "\n" not in message
    assert err.value.details["operators"] == {"ai.onnx.ml": {"LinearClassifier": 1, "Normalizer": 1}}
    assert not (tmp_path / "iris.bundle").exists()
    vm = build_bundle(tmp_path / "logreg.onnx", name="iris", version="1", release=1, keyring=keyring,
                      out=tmp_path / "iris.bundle", validation=rows)
    assert vm.manifest.quantization.mode == "none"


def test_dynamic_int8_on_a_convolution_only_model_names_static(keyring: Keyring, tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    with pytest.raises(QuantizationError, match=r"its operators are ai\.onnx: Conv, Relu\. Static int8 "
                       r"reaches its Conv: build it with --quantize static --calibration FILE\.npz, or "
                       r"unquantized with --quantize none$"):
        build_bundle(tmp_path / "cnn.onnx", name="cnn", version="1", release=1, keyring=keyring,
                     out=tmp_path / "cnn.bundle", quantization="dynamic")


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
    done = cli("bundle", "build", str(tmp_path / "det.onnx"), "--name", "det", "--version", "1", "--offline",
               "--quantize", "static", "--calibration", str(tmp_path / "cal.npz"), "--max-error", "10",
               "--detections", "det:2:4:0.5", "--keys", str(tmp_path / "keys"),
               "-o", str(tmp_path / "det.bundle"))
    assert done.returncode != 0 and "keeps 0.00% of the float model's detections" in done.stderr, done.stderr
    done = cli("bundle", "build", str(tmp_path / "det.onnx"), "--name", "det", "--version", "1", "--offline",
               "--quantize", "dynamic", "--calibration", str(tmp_path / "cal.npz"),
               "--detections", "det:2:4:0.5", "--min-detections-kept", "0.95",
               "--keys", str(tmp_path / "keys"), "-o", str(tmp_path / "det.bundle"))
    assert done.returncode == 0, done.stderr
    assert "detections kept 99.2% (worst output; bound 0.95)" in done.stdout, done.stdout
