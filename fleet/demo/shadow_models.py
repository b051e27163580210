"""A candidate that behaves differently on live traffic only, for shadow evaluation.

``write_divergent_classifier`` writes the demo classifier (``fleet.demo.models``, same
weights for the same seed) whose class scores are reversed on rows whose largest value
reaches ``threshold``: on the golden inputs in [0, 1) it matches the serving release to
the last bit, so its smoke test passes; on field traffic (values up to 2.2) its top class
differs on most rows, which only a comparison on live requests reveals. It never fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_divergent_classifier(path: Path, *, seed: int = 0, threshold: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(np.array(threshold, dtype=np.float32), "threshold"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
        helper.make_node("ReduceMax", ["x"], ["xmax"], axes=[1], keepdims=1),
        helper.make_node("Less", ["xmax", "threshold"], ["in_range"]),
        helper.make_node("Neg", ["logits"], ["reversed"]),
        helper.make_node("Where", ["in_range", "logits", "reversed"], ["chosen"]),
        helper.make_node("Softmax", ["chosen"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgefleet_demo_classifier_divergent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())
