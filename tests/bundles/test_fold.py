"""Exact float rewrites before int8 (fleet.bundles.fold) on small graphs built here, and on
the real PP-OCRv4 recogniser through the static quantization path of the bundle build."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleet.bundles.fold import fold_conv_affine, fuse_hardswish, rewrite
from fleet.bundles.quantize import prepare

C = 4


def _const(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: list[str],
           opset: int = 14) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 5, 5])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, C, 5, 5]) for o in outputs], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})  # type: ignore[no-any-return]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _conv_chain(scale: np.ndarray, shift: np.ndarray, *, bias: bool = True, shift_first: bool = False
                ) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [_const("w", rng.normal(size=(C, C, 3, 3))), _const("s", scale), _const("t", shift)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_const("b", rng.normal(size=C)))
        conv_in.append("b")
    conv = helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1])
    if shift_first:  # Conv -> Add -> Mul, constants on the left
        chain = [helper.make_node("Add", ["t", "c"], ["a"]), helper.make_node("Mul", ["s", "a"], ["y"])]
    else:
        chain = [helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    return _model([conv, *chain], inits, ["y"])


X = np.random.default_rng(1).normal(size=(1, C, 5, 5)).astype(np.float32)


@pytest.mark.parametrize(("scale", "shift", "bias", "shift_first"), [
    (np.arange(1, C + 1).reshape(C, 1, 1) * 0.5, np.arange(C).reshape(1, C, 1, 1) - 1.0, True, False),
    (np.array(1.7), np.array([0.25]), True, False),
    (np.array([[[[2.0]]]]), np.arange(C).reshape(C, 1, 1), False, True),
])
def test_affine_chain_folded_into_conv(scale: np.ndarray, shift: np.ndarray, bias: bool,
                                       shift_first: bool) -> None:
    model = _conv_chain(scale, shift, bias=bias, shift_first=shift_first)
    want = _run(model, X)[0]
    assert fold_conv_affine(model) == 1
    assert _ops(model) == Counter({"Conv": 1})
    assert {t.name for t in model.graph.initializer} == {i for i in model.graph.node[0].input[1:]}
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, X)[0], want, rtol=1e-5, atol=1e-5)


def test_chain_stops_where_a_constant_is_not_per_channel() -> None:
    # [1, 1, 5] and [5] vary along W: not a per-channel affine
    for shift in (np.arange(5).reshape(1, 1, 5), np.arange(5)):
        model = _conv_chain(np.full((C, 1, 1), 2.0), shift)
        want = _run(model, X)[0]
        assert fold_conv_affine(model) == 1  # the Mul folds, the Add stays
        assert _ops(model) == Counter({"Conv": 1, "Add": 1})
        np.testing.assert_allclose(_run(model, X)[0], want, rtol=1e-5, atol=1e-5)


def test_chain_shared_by_two_users_is_not_folded() -> None:
    rng = np.random.default_rng(0)
    inits = [_const("w", rng.normal(size=(C, C, 1, 1))), _const("s", np.full((C, 1, 1), 3.0))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Mul", ["c", "s"], ["y"]),
             helper.make_node("Relu", ["c"], ["r"])]  # the conv's output is read twice
    model = _model(nodes, inits, ["y", "r"])
    before = model.SerializeToString()
    assert fold_conv_affine(model) == 0
    assert model.SerializeToString() == before
    # and a conv whose output is itself a graph output keeps it
    model = _model(nodes[:2], inits, ["c", "y"])
    assert fold_conv_affine(model) == 0


def _hardswish(x_first_in_mul: bool, x_first_in_add: bool, opset: int = 14) -> onnx.ModelProto:
    inits = [_const("three", np.array(3.0)), _const("zero", np.array(0.0)), _const("six", np.array(6.0))]
    add_in = ["x", "three"] if x_first_in_add else ["three", "x"]
    mul_in = ["x", "cl"] if x_first_in_mul else ["cl", "x"]
    nodes = [helper.make_node("Add", add_in, ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["cl"]),
             helper.make_node("Mul", mul_in, ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    return _model(nodes, inits, ["y"], opset=opset)


@pytest.mark.parametrize("x_first_in_mul", [True, False])
@pytest.mark.parametrize("x_first_in_add", [True, False])
def test_written_out_hardswish_fused(x_first_in_mul: bool, x_first_in_add: bool) -> None:
    x = (X * 4).astype(np.float32)  # across both knees (-3, 3)
    model = _hardswish(x_first_in_mul, x_first_in_add)
    want = _run(model, x)[0]
    assert fuse_hardswish(model) == 1
    assert _ops(model) == Counter({"HardSwish": 1})
    assert not model.graph.initializer
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, x)[0], want, rtol=1e-5, atol=1e-5)


def test_hardswish_with_other_constants_left_alone() -> None:
    model = _hardswish(True, True)
    model.graph.initializer[0].CopyFrom(_const("three", np.array(2.0)))  # x + 2: not HardSwish
    assert fuse_hardswish(model) == 0
    assert _ops(model)["HardSwish"] == 0


def test_opset_below_14_left_as_is_then_rewrite_converts(tmp_path: Path) -> None:
    model = _hardswish(False, True, opset=13)
    assert fuse_hardswish(model) == 0 and _ops(model)["Div"] == 1
    src, dst = tmp_path / "m13.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert rewrite(src, dst, [{"x": X * 4}]) == {"conv_affine_folded": 0, "hardswish_fused": 1}
    out = onnx.load(str(dst))
    assert out.opset_import[0].version == 14 and _ops(out) == Counter({"HardSwish": 1})
    assert not rewrite(dst, tmp_path / "again.onnx", [{"x": X}])  # nothing left to rewrite
    assert not (tmp_path / "again.onnx").exists()


def test_ppocrv4_rec_rewritten_exactly(rapidocr_models: Path, tmp_path: Path) -> None:
    from tests.bundles.test_quantize_real_models import text_images

    pre = prepare(rapidocr_models / "ch_PP-OCRv4_rec_infer.onnx", tmp_path)
    samples = text_images(2, 48, 320)
    counts = rewrite(pre, tmp_path / "folded.onnx", samples)
    # PPLCNetV3: 28 blocks, each with a Conv -> Mul -> Add affine and a written-out HardSwish
    assert counts == {"conv_affine_folded": 28, "hardswish_fused": 28}
    before, after = onnx.load(str(pre)), onnx.load(str(tmp_path / "folded.onnx"))
    assert _ops(before)["Div"] - _ops(after)["Div"] == 28 and _ops(after)["HardSwish"] == 28
    f = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"])
    r = ort.InferenceSession(str(tmp_path / "folded.onnx"), providers=["CPUExecutionProvider"])
    for s in text_images(2, 48, 320, seed=5):
        np.testing.assert_allclose(r.run(None, s)[0], f.run(None, s)[0], rtol=1e-5, atol=1e-5)
