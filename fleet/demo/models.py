"""The demo's model, built in code with onnx.helper.

A small classifier: ``x`` float32 [batch, 4] -> ``probs`` float32 [batch, 3].
The faulty variant computes the same probabilities but also looks up
``table[floor(max(x))]`` in a two-entry table: on inputs in [0, 1) (its golden
vectors) that is fine, on real traffic with values >= 2 onnxruntime fails with
an out-of-bounds Gather. Only health telemetry from the field reveals it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_classifier(path: Path, *, faulty: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    inits = [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
    ]
    if faulty:
        inits += [
            numpy_helper.from_array(np.array([0.0, 0.0], dtype=np.float32), "table"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        nodes += [
            helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
            helper.make_node("Floor", ["xmax"], ["xfloor"]),
            helper.make_node("Cast", ["xfloor"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["looked_up"], axis=0),
            helper.make_node("Mul", ["looked_up", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits", "nothing"], ["logits2"]),
            helper.make_node("Softmax", ["logits2"], ["probs"], axis=-1),
        ]
    else:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "edgefleet_demo_classifier" + ("_faulty" if faulty else ""),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())


def golden_inputs(batch: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs in [0, 1): what the model was validated on."""
    return {"x": np.random.default_rng(seed).random((batch, 4), dtype=np.float32)}


def field_traffic(rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    """What devices see in the field: values up to 2.2, so about a third of rows reach 2."""
    return (rng.random((batch, 4)) * 2.2).astype(np.float32)


def write_tflite_classifier(path: Path, *, int8_weights: bool = False, seed: int = 0) -> np.ndarray:
    """The same kind of classifier as a TFLite flatbuffer, written with LiteRT's schema.

    ``x`` float32 [batch, 4] -> ``probs`` float32 [batch, 3] (FULLY_CONNECTED + SOFTMAX).
    With ``int8_weights`` the weights are int8 per-channel (dynamic-range quantization, as
    the TFLite converter writes it). Returns the float weights [3, 4].
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(3, 4)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    buffers = [s.BufferT()]  # buffer 0 is the empty one by convention

    def buffer(arr: np.ndarray) -> int:
        b = s.BufferT()
        b.data = np.frombuffer(arr.tobytes(), np.uint8).tolist()
        buffers.append(b)
        return len(buffers) - 1

    def tensor(name: str, shape: list[int], ttype: int, buf: int = 0, signature: list[int] | None = None,
               quant: object | None = None) -> object:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, ttype, buf
        if signature is not None:
            t.shapeSignature = signature
        if quant is not None:
            t.quantization = quant
        return t

    tensors = [tensor("x", [1, 4], s.TensorType.FLOAT32, signature=[-1, 4])]
    if int8_weights:
        scale = np.abs(weights).max(axis=1) / 127.0
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = scale.tolist(), [0, 0, 0], 0
        wq = np.round(weights / scale[:, None]).astype(np.int8)
        tensors.append(tensor("W", [3, 4], s.TensorType.INT8, buffer(wq), quant=q))
    else:
        tensors.append(tensor("W", [3, 4], s.TensorType.FLOAT32, buffer(weights)))
    tensors += [
        tensor("B", [3], s.TensorType.FLOAT32, buffer(bias)),
        tensor("logits", [1, 3], s.TensorType.FLOAT32, signature=[-1, 3]),
        tensor("probs", [1, 3], s.TensorType.FLOAT32, signature=[-1, 3]),
    ]
    codes = []
    for builtin in (s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.SOFTMAX):
        code = s.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = builtin
        code.version = 1
        codes.append(code)
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = 0, [0, 1, 2], [3]
    fc.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = s.FullyConnectedOptionsT()
    fc.builtinOptions.asymmetricQuantizeInputs = int8_weights
    softmax = s.OperatorT()
    softmax.opcodeIndex, softmax.inputs, softmax.outputs = 1, [3], [4]
    softmax.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
    softmax.builtinOptions = s.SoftmaxOptionsT()
    softmax.builtinOptions.beta = 1.0
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs = tensors, [0], [4]
    graph.operators, graph.name = [fc, softmax], b"main"
    model = s.ModelT()
    model.version, model.description = 3, b"edgefleet demo classifier"
    model.operatorCodes, model.subgraphs, model.buffers = codes, [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))
    return weights
