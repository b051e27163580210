"""Exact float rewrites of an ONNX graph before int8 quantization.

Exported CNNs carry small elementwise chains that onnxruntime's optimizer does not fuse once
Q/DQ pairs sit between the nodes, and that its int8 kernels run slower than the float ones
(QLinearMul, QLinearAdd: one requantization per element). PP-OCRv4 rec (PPLCNetV3) has,
per block, ``Conv -> Mul(scale) -> Add(bias)`` (a learnable affine) and a HardSwish written
out as ``x * Clip(x + 3, 0, 6) / 6``: 28 blocks, 168 elementwise nodes. Both rewrites here
compute the same function in float:

- ``fold_conv_affine``: Mul/Add by a constant (scalar or one value per output channel)
  right after a Conv are folded into its weights and bias;
- ``fuse_hardswish``: the written-out HardSwish becomes the HardSwish op (opset 14).

``rewrite`` applies both to a file and keeps the result only when it computes the same
outputs as the original (within RTOL/ATOL) on the samples given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

HARDSWISH_OPSET = 14
RTOL = ATOL = 1e-5


class _Graph:
    """Producers, consumers and constants of a graph (its top level)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.consts: dict[str, np.ndarray] = {
            k: numpy_helper.to_array(t) for k, t in self.inits.items()
        }
        for n in graph.node:
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def only_use(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name``, unless it is read more than once or is a graph output."""
        users = self.users.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def scalar(self, name: str, value: float) -> bool:
        c = self.consts.get(name)
        return c is not None and c.size == 1 and float(c.reshape(())) == value

    def replace(self, drop: set[tuple[str, str]], put: dict[tuple[str, str], onnx.NodeProto]) -> None:
        """Drop nodes and put a node in place of others, keeping the order. Nodes are named by
        (op type, first output): a folded Conv takes over its chain's last output name."""
        kept = [put.get(_key(n), n) for n in self.graph.node if _key(n) not in drop or _key(n) in put]
        del self.graph.node[:]
        self.graph.node.extend(kept)


def _key(n: onnx.NodeProto) -> tuple[str, str]:
    return n.op_type, n.output[0]


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant as one value per output channel of a conv whose output has ``rank`` axes
    (N, C, spatial...): a scalar or [(1,) C, 1, ...]; None for anything that broadcasts the
    output to another shape or varies along a spatial axis."""
    if c.ndim > rank:
        return None
    if c.size == 1:
        return np.full(channels, float(c.reshape(())), np.float64)
    spatial = rank - 2
    if c.size == channels and c.ndim >= spatial + 1 and c.shape[-spatial - 1] == channels:
        return c.reshape(channels).astype(np.float64)
    return None


def fold_conv_affine(model: onnx.ModelProto) -> int:
    """Fold ``Conv -> (Mul|Add by a constant)*`` into the Conv; return how many convs changed."""
    g = _Graph(model.graph)
    drop: set[tuple[str, str]] = set()
    folded = 0
    for conv in list(model.graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in g.inits:
            continue
        w = g.consts[conv.input[1]].astype(np.float64)
        cout = w.shape[0]
        has_bias = len(conv.input) > 2 and conv.input[2] != ""
        if has_bias and conv.input[2] not in g.inits:
            continue
        b = g.consts[conv.input[2]].astype(np.float64) if has_bias else np.zeros(cout)
        scale, shift = np.ones(cout), np.zeros(cout)
        end, chain = conv.output[0], []
        while (n := g.only_use(end)) is not None and n.op_type in ("Mul", "Add") and len(n.input) == 2:
            other = n.input[1] if n.input[0] == end else n.input[0]
            c = g.consts.get(other) if other in g.inits else None
            pc = _per_channel(c, cout, w.ndim) if c is not None and c.dtype == np.float32 else None
            if pc is None:
                break
            if n.op_type == "Mul":
                scale, shift = scale * pc, shift * pc
            else:
                shift = shift + pc
            chain.append(n)
            end = n.output[0]
        if not chain:
            continue
        w_name, b_name = f"{conv.input[1]}__folded{folded}", f"{conv.name or conv.output[0]}__bias{folded}"
        w_new = w * scale.reshape((cout,) + (1,) * (w.ndim - 1))
        model.graph.initializer.extend([
            numpy_helper.from_array(w_new.astype(np.float32), w_name),
            numpy_helper.from_array((b * scale + shift).astype(np.float32), b_name),
        ])
        inputs = [conv.input[0], w_name, b_name]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = end
        drop.update(_key(n) for n in chain)
        folded += 1
    g.replace(drop, {})
    _drop_unused_initializers(model)
    return folded


def fuse_hardswish(model: onnx.ModelProto) -> int:
    """Replace ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` with ``HardSwish(x)``; return how many.

    Below opset 14 (HARDSWISH_OPSET), which has no HardSwish, the model is left as it is (0)."""
    if _opset(model) < HARDSWISH_OPSET:
        return 0
    g = _Graph(model.graph)
    drop: set[tuple[str, str]] = set()
    put: dict[tuple[str, str], onnx.NodeProto] = {}
    for div in model.graph.node:
        if div.op_type != "Div" or not g.scalar(div.input[1], 6.0):
            continue
        mul = g.producer.get(div.input[0])
        if mul is None or mul.op_type != "Mul" or g.only_use(mul.output[0]) is not div:
            continue
        for x, c in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            clip = g.producer.get(c)
            if clip is None or clip.op_type != "Clip" or g.only_use(clip.output[0]) is not mul:
                continue
            add = g.producer.get(clip.input[0])
            if add is None or add.op_type != "Add" or g.only_use(add.output[0]) is not clip:
                continue
            if sorted(add.input) != sorted([x, add.input[1] if add.input[0] == x else add.input[0]]) or not (
                (add.input[0] == x and g.scalar(add.input[1], 3.0))
                or (add.input[1] == x and g.scalar(add.input[0], 3.0))
            ):
                continue
            bounds = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
            if not (g.scalar(bounds[0], 0.0) and g.scalar(bounds[1], 6.0)):
                continue
            drop.update({_key(add), _key(clip), _key(mul), _key(div)})
            put[_key(div)] = helper.make_node("HardSwish", [x], [div.output[0]],
                                                  name=f"{div.name}_hardswish")
            break
    g.replace(drop, put)
    _drop_unused_initializers(model)
    return len(put)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def rewrite(src: Path, dst: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """Write ``src`` with both rewrites to ``dst`` (converted to opset 14 first when it is
    below) and return how many of each were made; an empty dict, and nothing written, when
    nothing was rewritten or when the rewritten model's outputs differ from the original's on
    ``samples`` past RTOL/ATOL (then it is logged and the original is to be used)."""
    import onnxruntime as ort
    from onnx import version_converter

    model = onnx.load(str(src))
    if _opset(model) < HARDSWISH_OPSET:
        try:
            model = version_converter.convert_version(model, HARDSWISH_OPSET)
        except Exception as exc:  # any converter failure: fold only
            log.info("opset conversion to %d failed (%s): HardSwish not fused", HARDSWISH_OPSET, exc)
            model = onnx.load(str(src))
    counts = {"conv_affine_folded": fold_conv_affine(model), "hardswish_fused": fuse_hardswish(model)}
    if not any(counts.values()):
        return {}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    before = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for sample in samples:
        for name, f, r in zip([o.name for o in before.get_outputs()], before.run(None, sample),
                              after.run(None, sample), strict=True):
            if f.shape != r.shape or not np.allclose(f, r, rtol=RTOL, atol=ATOL):
                diff = float(np.abs(f - r).max()) if f.shape == r.shape else float("inf")
                log.warning("float rewrites %s change output %r (max abs diff %.3g): not used",
                            counts, name, diff)
                return {}
    onnx.save(model, str(dst))
    return counts


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}

    def in_subgraphs(graph: onnx.GraphProto) -> set[str]:
        names: set[str] = set()
        for n in graph.node:
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    names |= {i for m in sub.node for i in m.input} | in_subgraphs(sub)
        return names

    used |= in_subgraphs(model.graph)
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
