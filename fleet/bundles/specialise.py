"""Specialise an ONNX graph on inputs fixed for a deployment (``--fix-input sr=16000``).

Exported models often keep their layers inside ``If`` branches chosen by an input (silero
VAD picks its 8 kHz or 16 kHz weights by ``sr``); onnxruntime's quantizer does not enter
subgraphs, so such a model has nothing to quantize. When the deployment fixes that input,
the input becomes a constant, every main-graph node whose inputs are all constants is
folded, each ``If`` whose condition is then known is replaced by its taken branch, and the
constant weights become initializers the quantizer reaches. The input stays in the
signature (callers keep sending it); the device refuses any other value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import MalformedDocumentError

MAX_PASSES = 8


class SpecialiseError(MalformedDocumentError):
    code = "specialise"


def parse_fixed_inputs(items: list[str]) -> dict[str, str]:
    """``["sr=16000"]`` -> ``{"sr": "16000"}``; the value is cast to the input's dtype later."""
    fixed: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SpecialiseError(f"--fix-input {item!r} must read NAME=VALUE (e.g. sr=16000)")
        fixed[name] = value
    return fixed


def fixed_arrays(fixed: dict[str, str], specs: list[Any]) -> dict[str, np.ndarray]:
    """The fixed values as arrays of their inputs' dtypes; only scalar inputs can be fixed."""
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for name, text in fixed.items():
        spec = by_name.get(name)
        if spec is None:
            raise SpecialiseError(f"--fix-input {name}: the model has no input {name!r} "
                                  f"(it takes {sorted(by_name)})")
        if spec.shape:
            raise SpecialiseError(f"--fix-input {name}: input {name!r} has shape {spec.shape}; "
                                  "only scalar (rank-0) inputs can be fixed")
        try:
            value = np.array(float(text) if np.dtype(spec.dtype).kind == "f" else int(text),
                             dtype=spec.dtype)
        except ValueError:
            raise SpecialiseError(f"--fix-input {name}={text}: not a {spec.dtype} value") from None
        out[name] = value
    return out


def _eval_node(node: Any, consts: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """The node's outputs on constant inputs (onnx's reference evaluator); None if it cannot."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    try:
        names = [n for n in node.input if n]
        graph = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(consts[n].dtype),
                                                list(consts[n].shape)) for n in node.input if n],
            [onnx.helper.make_empty_tensor_value_info(n) for n in node.output],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(model).run(None, {n: consts[n] for n in names})
        return [np.asarray(r) for r in results]
    except Exception:
        return None


def specialise(src: Path, dst: Path, fixed: dict[str, np.ndarray]) -> dict[str, int]:
    """Write ``src`` specialised on ``fixed`` to ``dst``; return what was folded (figures)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update(fixed)
    # the fixed dims of the graph's inputs: Gather(Shape(state), 0) of a [2, batch, 128] state
    # is 2 whatever the batch, and exported graphs choose branches by such dims
    input_dims = {
        i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    shapes: dict[str, list[int | None]] = {}
    folded_ifs = folded_nodes = 0
    for _ in range(MAX_PASSES):
        changed = False
        nodes: list[Any] = []
        for node in graph.node:
            if node.op_type == "Shape" and node.input[0] in input_dims and not node.attribute:
                shapes[node.output[0]] = input_dims[node.input[0]]
            if (node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in consts
                    and all(a.i == 0 for a in node.attribute if a.name == "axis")):
                dims = shapes[node.input[0]]
                index = np.asarray(consts[node.input[1]])
                picked = [dims[int(i)] for i in index.reshape(-1)]
                if all(d is not None for d in picked):
                    value = np.asarray(picked, dtype=np.int64).reshape(index.shape)
                    consts[node.output[0]] = value
                    graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                    folded_nodes += 1
                    changed = True
                    continue
            has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for a in node.attribute)
            if node.op_type == "If" and node.input[0] in consts:
                taken = "then_branch" if bool(np.asarray(consts[node.input[0]]).reshape(-1)[0]) \
                    else "else_branch"
                branch = next(a.g for a in node.attribute if a.name == taken)
                nodes.extend(branch.node)
                graph.initializer.extend(branch.initializer)
                for inner, outer in zip(branch.output, node.output, strict=True):
                    nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer]))
                folded_ifs += 1
                changed = True
                continue
            if (not has_subgraph and node.op_type != "Constant" and node.input
                    and all(n in consts for n in node.input if n)):
                results = _eval_node(node, consts, opset)
                if results is not None:
                    for name, value in zip(node.output, results, strict=True):
                        consts[name] = value
                        graph.initializer.append(numpy_helper.from_array(value, name))
                    folded_nodes += 1
                    changed = True
                    continue
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                value = numpy_helper.to_array(node.attribute[0].t)
                consts[node.output[0]] = value
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                changed = True
                continue
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        if not changed:
            break
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    _subgraph_names(graph, used)
    keep = [t for t in graph.initializer if t.name in used]
    unique: dict[str, Any] = {}
    for t in keep:
        unique[t.name] = t
    del graph.initializer[:]
    graph.initializer.extend(unique.values())
    if not folded_ifs:
        raise SpecialiseError(
            f"fixing {sorted(fixed)} folds no If node of this model: nothing chooses a branch by "
            "it, so specialising does not help; leave --fix-input out"
        )
    onnx.save(model, str(dst))
    return {"if_folded": folded_ifs, "nodes_folded": folded_nodes}


def _subgraph_names(graph: Any, used: set[str]) -> None:
    """Add the outer names that nested subgraphs read (they stay needed)."""
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                used.update(n for inner in sub.node for n in inner.input)
                _subgraph_names(sub, used)
