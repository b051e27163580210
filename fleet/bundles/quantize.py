"""ONNX int8 quantization with the pre-processing real exported models need, and a
measured comparison of the quantized model against the float one.

Steps (each learnt on models that PyPI packages ship):
- a model with none of the operators whose weights the mode quantizes is refused first,
  naming its operators by domain (a scikit-learn model holds ai.onnx.ml operators only);
- opset below 13 is converted up: QDQ's per-channel DequantizeLinear needs opset 13;
- ``quant_pre_process`` (optimisation + shape inference); symbolic shape inference
  fails on some graphs (PP-OCR), so it falls back to ONNX shape inference only;
- dynamic int8 for MatMul/RNN-heavy models (those ops only: DYNAMIC_OPS), static QDQ
  int8 with a calibration set for CNNs;
- the quantized model runs beside the float one on the validation samples and the
  agreement is measured (per output and channel; top-1 agreement and detections kept where
  the build is told the layout); the build refuses when it is past the user's bounds.
All temporary files live in a private directory (the pre-processor writes to cwd).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.bundle.manifest import TensorSpec
from shared.errors import EdgefleetError, MalformedDocumentError

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13
MODES = ("none", "dynamic", "static")
RMS_FLOOR = 1e-3
MAX_CHANNELS = 256
# Detections (--detections): a YOLO-style detector's usual confidence threshold, and the share
# of the float model's detections the quantized one must keep
DEFAULT_SCORE_THRESHOLD = 0.25
DEFAULT_MIN_DETECTIONS_KEPT = 0.9
# Dynamic int8 covers the matrix and recurrent ops it suits; convolutions go static (QDQ with
# calibration): dynamic ConvInteger quantizes each activation per tensor at run time, and
# on silero VAD's encoder that alone drove the output's relative error to 1.1 (cosine 0.53).
DYNAMIC_OPS = ("MatMul", "Gemm", "LSTM", "GRU", "Attention", "EmbedLayerNormalization")
# The standard ONNX operators whose weights static QDQ int8 turns into int8 tensors.
STATIC_WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather")
ONNX_DOMAINS = ("", "ai.onnx")
# Why int8 cannot reach operators of other domains, for the message that says so
DOMAIN_NOTES = {
    "ai.onnx.ml": "traditional machine-learning operators, as skl2onnx exports scikit-learn "
                  "models, whose coefficients are attributes, not weight tensors",
}

Sample = dict[str, np.ndarray]


class QuantizationError(EdgefleetError):
    code = "quantization"


class AccuracyBoundError(QuantizationError):
    """The quantized model disagrees with the float one past the user's bound."""

    code = "accuracy_bound"


def _class_channels(x: np.ndarray, axis: int, first: int) -> np.ndarray:
    """The class channels of ``x``: ``first`` on along ``axis`` (already non-negative)."""
    index: list[slice] = [slice(None)] * x.ndim
    index[axis] = slice(first, None)
    return x[tuple(index)]


@dataclass(frozen=True)
class ClassScores:
    """Where an output holds class scores: its index, the class axis, and the first class
    channel on that axis (a detector's [.., 4 box + 18 classes] row: ``first=4``)."""

    output: int
    axis: int = -1
    first: int = 0

    def top1(self, f: np.ndarray, q: np.ndarray) -> tuple[int, int]:
        """(rows where both models pick the same class, rows)."""
        axis = self.axis % f.ndim
        fs, qs = _class_channels(f, axis, self.first), _class_channels(q, axis, self.first)
        if fs.shape[axis] < 2:
            return 0, 0
        same = fs.argmax(axis) == qs.argmax(axis)
        return int(same.sum()), int(same.size)


@dataclass(frozen=True)
class Detections:
    """Where an output holds detections: its index, the class axis, the first class channel
    on it (the channels before are box coordinates, objectness, ...) and the score
    threshold. Every position off the class axis is a candidate (an anchor of a
    [1, anchors, 4 + 18] output); it is a detection when its best class score is at least
    ``threshold``. The quantized model keeps a float detection when the same anchor is a
    detection in its output too, with the same top class."""

    output: int
    axis: int = -1
    first: int = 0
    threshold: float = DEFAULT_SCORE_THRESHOLD

    def count(self, f: np.ndarray, q: np.ndarray) -> tuple[int, int, int]:
        """(float detections, those the quantized model keeps, quantized-only detections)."""
        axis = self.axis % f.ndim
        fs, qs = _class_channels(f, axis, self.first), _class_channels(q, axis, self.first)
        if fs.shape[axis] < 1:
            return 0, 0, 0
        f_on, q_on = fs.max(axis) >= self.threshold, qs.max(axis) >= self.threshold
        kept = f_on & q_on & (fs.argmax(axis) == qs.argmax(axis))
        return int(f_on.sum()), int(kept.sum()), int((q_on & ~f_on).sum())


def _parse_layout(flag: str, form: str, text: str, outputs: list[TensorSpec]) -> tuple[int, list[str]]:
    """``OUTPUT[:AXIS[:FIRST...]]``: the output's index, and the parts after its name, of
    which AXIS and FIRST (when given) are checked against the output's shape."""
    parts = text.split(":")
    names = [o.name for o in outputs]
    if parts[0] not in names or len(parts) > form.count(":") + 1:
        raise MalformedDocumentError(f"{flag} {text!r} must read {form} with OUTPUT one of {names}")
    spec = outputs[names.index(parts[0])]
    try:
        axis = int(parts[1]) if len(parts) > 1 else -1
        first = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise MalformedDocumentError(f"{flag} {text!r}: AXIS and FIRST are integers") from None
    rank = len(spec.shape)
    size = spec.shape[axis] if -rank <= axis < rank else None
    if not -rank <= axis < rank or first < 0 or (isinstance(size, int) and first >= size):
        raise MalformedDocumentError(
            f"{flag} {text!r}: output {spec.name!r} has rank {rank} (shape {spec.shape}); "
            f"axis {axis} / first class {first} do not fit"
        )
    return names.index(parts[0]), [str(axis), str(first), *parts[3:]]


def parse_class_scores(text: str, outputs: list[TensorSpec]) -> ClassScores:
    """``OUTPUT[:AXIS[:FIRST]]`` (``--class-scores det:2:4``) against the model's outputs."""
    index, rest = _parse_layout("--class-scores", "OUTPUT[:AXIS[:FIRST]]", text, outputs)
    return ClassScores(index, int(rest[0]), int(rest[1]))


def parse_detections(text: str, outputs: list[TensorSpec]) -> Detections:
    """``OUTPUT[:AXIS[:FIRST[:THRESHOLD]]]`` (``--detections det:2:4:0.25``) against the
    model's outputs; THRESHOLD defaults to DEFAULT_SCORE_THRESHOLD."""
    index, rest = _parse_layout("--detections", "OUTPUT[:AXIS[:FIRST[:THRESHOLD]]]", text, outputs)
    try:
        threshold = float(rest[2]) if len(rest) > 2 else DEFAULT_SCORE_THRESHOLD
    except ValueError:
        raise MalformedDocumentError(f"--detections {text!r}: THRESHOLD is a number") from None
    if not np.isfinite(threshold):
        raise MalformedDocumentError(f"--detections {text!r}: THRESHOLD must be finite")
    return Detections(index, int(rest[0]), int(rest[1]), threshold)


@dataclass
class OutputAgreement:
    """One output's figures. The relative error is measured per channel along the feature
    axis and the worst channel decides: a collapse of a few small-valued channels (class
    scores beside box coordinates) is not hidden by the large values of the others."""

    # worst channel: ||q - f|| / max(||f||, median channel's ||f||, RMS_FLOOR * sqrt(n))
    rel_l2_error: float
    worst_channel: int  # -1 when the output is measured as one tensor
    feature_axis: int  # -1 when the output has no feature axis (measured whole)
    tensor_rel_l2_error: float  # the whole tensor's, for comparison
    cosine: float
    max_abs_error: float
    # with a detection layout (Detections) on this output, else None:
    detection_threshold: float | None = None
    detections: int | None = None  # float model's detections over the validation samples
    detections_kept: float | None = None  # share of them the quantized model keeps
    detections_extra: int | None = None  # the quantized model's detections the float one lacks

    def as_manifest(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


@dataclass
class Agreement:
    """How closely the quantized model follows the float one on the validation set."""

    samples: int
    max_abs_error: float
    # the worst output's worst channel (OutputAgreement.rel_l2_error): relative, but
    # near-zero outputs (an empty detection map) do not turn a tiny absolute error into a huge one
    rel_l2_error: float
    cosine: float  # worst output
    argmax_agreement: float | None  # top-1 agreement over the class axis (ClassScores)
    per_output: dict[str, OutputAgreement] = field(default_factory=dict)
    detections_kept: float | None = None  # worst output's share of detections kept (Detections)

    def as_manifest(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None and k != "per_output"}

    def worst_output(self) -> str:
        return max(self.per_output, key=lambda n: self.per_output[n].rel_l2_error, default="")


def split_samples(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], what: str) -> list[Sample]:
    """Split arrays keyed by input name into samples (feeds). The rule, in order:

    1. every array at its input's own rank: the file is ONE feed, exactly as the model takes
       it (a stateful model's ``input`` [1, 512], ``state`` [2, 1, 128], ``sr`` 0-d) -- except
       when every input's first axis is dynamic (a batch axis): then each row of that axis is
       a sample (``a[i:i+1]``: a dataset of images for a [batch, C, H, W] input);
    2. every array with one more axis than its input: samples stacked on a new first axis
       (``a[i]``: N feeds of a stateful model, N scalars for a rank-0 input);
    anything else is refused, naming the input and both ranks.
    """
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise MalformedDocumentError(
            f"{what} lack arrays for inputs {missing}; they have {sorted(arrays)}"
        )
    own = all(arrays[s.name].ndim == len(s.shape) for s in inputs)
    stacked = all(arrays[s.name].ndim == len(s.shape) + 1 for s in inputs)
    if own:
        rows = all(s.shape and not isinstance(s.shape[0], int) for s in inputs)
        if not rows:
            return [{s.name: arrays[s.name] for s in inputs}]
        counts = {s.name: arrays[s.name].shape[0] for s in inputs}
        take = lambda a, i: a[i : i + 1]  # noqa: E731
    elif stacked:
        counts = {s.name: arrays[s.name].shape[0] for s in inputs}
        take = lambda a, i: a[i]  # noqa: E731
    else:
        ranks = ", ".join(
            f"{s.name}: array rank {arrays[s.name].ndim}, input rank {len(s.shape)}" for s in inputs
        )
        raise MalformedDocumentError(
            f"{what}: give every array at its input's own rank (one feed) or every array with "
            f"one more leading axis (samples stacked on it), not a mix ({ranks})"
        )
    if len(set(counts.values())) != 1 or not next(iter(counts.values()), 0):
        raise MalformedDocumentError(f"{what}: every input needs the same number of samples, got {counts}")
    n = next(iter(counts.values()))
    return [{s.name: take(arrays[s.name], i) for s in inputs} for i in range(n)]


def load_samples(path: Path, inputs: list[TensorSpec], what: str) -> list[Sample]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise MalformedDocumentError(f"cannot read {what} {path} as .npz: {exc}") from None
    return split_samples(arrays, inputs, f"{what} {path}")


@contextlib.contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def prepare(src: Path, workdir: Path) -> Path:
    """Upgrade the opset when needed and run onnxruntime's quantization pre-processing."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    staged = workdir / "opset.onnx"
    if opset < MIN_QDQ_OPSET:
        log.info("converting opset %d -> %d for quantization", opset, MIN_QDQ_OPSET)
        try:
            model = version_converter.convert_version(model, MIN_QDQ_OPSET)
        except Exception as exc:
            raise QuantizationError(
                f"the model uses opset {opset}; converting it to {MIN_QDQ_OPSET} failed: {exc}"
            ) from None
    onnx.save(model, str(staged))
    out = workdir / "preprocessed.onnx"
    with _in_directory(workdir):
        try:
            quant_pre_process(str(staged), str(out), skip_symbolic_shape=False)
        except Exception as exc:
            log.info("symbolic shape inference failed (%s); using ONNX shape inference", exc)
            quant_pre_process(str(staged), str(out), skip_symbolic_shape=True)
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over in-memory samples."""

    def __init__(self, samples: list[Sample]):
        self._it = iter(samples)

    def get_next(self) -> Sample | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - called by some calibrators only
        pass


def quantize(src: Path, dst: Path, mode: str, calibration: list[Sample] | None = None, *,
             fold: bool = True) -> dict[str, int]:
    """Write an int8 model of ``src`` to ``dst``; return the exact float rewrites made before
    static quantization (fleet.bundles.fold, with ``fold``: name -> count; empty when none)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise QuantizationError(f"quantization mode {mode!r} must be dynamic or static")
    if mode == "static" and not calibration:
        raise QuantizationError("static quantization needs a calibration set (--calibration FILE.npz)")
    already = _int8_weights(Path(src))
    if already:
        raise QuantizationError(
            f"the model is already quantized: it holds {already} int8/uint8 weight tensors, so "
            f"{mode} quantization has nothing to do; build it with --quantize none",
            int8_weights=already,
        )
    _check_int8_applies(Path(src), mode)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        workdir = Path(tmp)
        pre = prepare(Path(src), workdir)
        rewrites: dict[str, int] = {}
        if mode == "static" and fold:
            from fleet.bundles.fold import rewrite

            folded = workdir / "folded.onnx"
            rewrites = rewrite(pre, folded, (calibration or [])[:2])
            if rewrites:
                pre = folded
        with _in_directory(workdir):
            try:
                if mode == "dynamic":
                    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8,
                                     op_types_to_quantize=list(DYNAMIC_OPS))
                else:
                    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calibration)
                    quantize_static(
                        str(pre), str(dst), reader,
                        quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        per_channel=True,
                    )
            except QuantizationError:
                raise
            except Exception as exc:
                raise QuantizationError(f"onnxruntime could not quantize the model ({mode}): {exc}") from None
    if _int8_weights(Path(dst)) == 0:
        Path(dst).unlink(missing_ok=True)
        raise QuantizationError(
            f"{mode} quantization left no int8 weights in this model: its weights sit where "
            "onnxruntime's quantizer does not reach (e.g. inside If/Loop subgraphs). When a scalar "
            "input chooses the branch and is fixed for the deployment, specialise on it "
            "(--fix-input NAME=VALUE, e.g. sr=16000); otherwise bundle it unquantized "
            "(--quantize none) or export a graph without control flow"
        )
    return rewrites


def _operators(path: Path) -> dict[str, dict[str, int]]:
    """Operator counts by domain ("ai.onnx" for the standard one), subgraphs included."""
    import onnx

    ops: dict[str, dict[str, int]] = {}

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = ops.setdefault(node.domain if node.domain not in ONNX_DOMAINS else "ai.onnx", {})
            domain[node.op_type] = domain.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(onnx.load(str(path)).graph)
    return ops


def _check_int8_applies(path: Path, mode: str) -> None:
    """Refuse, saying why and what to do, a model that has none of the operators whose
    weights ``mode`` int8 quantizes (a scikit-learn model of ai.onnx.ml operators only: the
    opset converter would fail on it with "opset 0", the quantizer would find nothing).
    Operators inside If/Loop subgraphs count: ``quantize`` names --fix-input for those."""
    ops = _operators(path)
    reached = DYNAMIC_OPS if mode == "dynamic" else STATIC_WEIGHT_OPS
    standard = ops.get("ai.onnx", {})
    if any(op in standard for op in reached):
        return
    listed = "; ".join(
        f"{domain}: " + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in sorted(counts.items()))
        + (f" ({DOMAIN_NOTES[domain]})" if domain in DOMAIN_NOTES else "")
        for domain, counts in sorted(ops.items())
    ) or "none"
    other = "static" if mode == "dynamic" else "dynamic"
    there = [op for op in (STATIC_WEIGHT_OPS if other == "static" else DYNAMIC_OPS) if op in standard]
    flags = "--quantize static --calibration FILE.npz" if other == "static" else "--quantize dynamic"
    todo = (f"{other} int8 reaches its {', '.join(there)}: build it with {flags}, or unquantized "
            "with --quantize none" if there else "build it unquantized with --quantize none")
    raise QuantizationError(
        f"int8 does not apply to this model: {mode} int8 quantizes the weights of the standard "
        f"ONNX operators {', '.join(reached)}, and the model has none of them; its operators are "
        f"{listed}. {todo[0].upper()}{todo[1:]}",
        operators=ops,
    )


def _int8_weights(path: Path) -> int:
    """Count int8/uint8 initializers, subgraphs included."""
    import onnx

    int8 = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

    def walk(graph: onnx.GraphProto) -> int:
        n = sum(1 for t in graph.initializer if t.data_type in int8)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    n += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    n += sum(walk(g) for g in attr.graphs)
        return n

    return walk(onnx.load(str(path)).graph)


def _session(path: Path) -> Any:  # an onnxruntime.InferenceSession (ort is imported lazily)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feature_axis(shape: list[int | str | None]) -> int:
    """The axis whose slices are an output's channels, from its signature: the smallest fixed
    axis after the first with more than one element (22 in a [1, 8400, 22] or [1, 22, 8400]
    detector output, 128 in a [2, batch, 128] state); -1 for outputs
    with none (a [batch, 1] score, a [batch, 1, H, W] map), measured as one tensor. An axis
    of more than MAX_CHANNELS entries is a vocabulary (6625 characters, 1000 classes): its
    rare entries are judged by top-1 agreement, not one by one."""
    sizes = {a: size for a, size in enumerate(shape)
             if a >= 1 and isinstance(size, int) and 1 < size <= MAX_CHANNELS}
    return min(sizes, key=lambda a: (sizes[a], a)) if sizes else -1


class _OutputSums:
    """Running per-channel sums of one output over the validation samples."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.diff_sq: np.ndarray | float = 0.0
        self.ref_sq: np.ndarray | float = 0.0
        self.q_sq: np.ndarray | float = 0.0
        self.dot: np.ndarray | float = 0.0
        self.count: np.ndarray | float = 0.0
        self.max_abs = 0.0

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        d = q - f
        self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        other = tuple(a for a in range(f.ndim) if a != self.axis)
        n = f.size // f.shape[self.axis] if self.axis >= 0 else f.size

        def per(x: np.ndarray) -> np.ndarray:
            return x.sum(axis=other) if self.axis >= 0 else np.asarray([x.sum()])

        self.diff_sq = self.diff_sq + per(d * d)
        self.ref_sq = self.ref_sq + per(f * f)
        self.q_sq = self.q_sq + per(q * q)
        self.dot = self.dot + per(f * q)
        self.count = self.count + n

    def figures(self) -> OutputAgreement:
        diff, ref = np.asarray(self.diff_sq), np.asarray(self.ref_sq)
        count = np.asarray(self.count, dtype=np.float64)
        # each channel's error against its own size, but never against less than the typical
        # (median) channel's: rounding noise on a near-empty channel is not a collapse
        ref_norm = np.sqrt(ref)
        rel = np.sqrt(diff) / np.maximum(np.maximum(ref_norm, float(np.median(ref_norm))),
                                         RMS_FLOOR * np.sqrt(count))
        worst = int(rel.argmax())
        total = np.sqrt(diff.sum()) / max(float(np.sqrt(ref.sum())), RMS_FLOOR * float(np.sqrt(count.sum())))
        cos = float(np.asarray(self.dot).sum()) / max(
            float(np.sqrt(ref.sum() * np.asarray(self.q_sq).sum())), 1e-12
        )
        return OutputAgreement(
            rel_l2_error=float(rel[worst]),
            worst_channel=worst if self.axis >= 0 else -1,
            feature_axis=self.axis,
            tensor_rel_l2_error=float(total),
            cosine=cos,
            max_abs_error=self.max_abs,
        )


def compare(
    float_model: Path, quant_model: Path, samples: list[Sample], *,
    class_scores: ClassScores | int | None = 0,
    detections: Sequence[Detections] = (),
) -> Agreement:
    """Run both models on every sample and measure how far the quantized one strays.

    Each output is measured per channel along its feature axis (``feature_axis``); the
    worst channel of the worst output decides. ``class_scores`` says where class scores are
    (an output index: on its last axis), whose top-1 agreement is measured; None: nowhere.
    ``detections`` name the outputs holding detections, whose share kept is measured; the
    float model must make some over the samples (else nothing would be measured).
    """
    layout = ClassScores(class_scores) if isinstance(class_scores, int) else class_scores
    detection_layouts = {d.output: d for d in detections}
    found: dict[int, tuple[int, int, int]] = {i: (0, 0, 0) for i in detection_layouts}
    if not samples:
        raise QuantizationError("the validation set is empty")
    f_sess, q_sess = _session(float_model), _session(quant_model)
    names = [o.name for o in f_sess.get_outputs()]
    axes = [feature_axis(list(o.shape)) for o in f_sess.get_outputs()]
    sums: dict[int, _OutputSums] = {}
    agree = total = 0
    for sample in samples:
        f_out = f_sess.run(None, sample)
        q_out = q_sess.run(None, sample)
        for i, (f, q) in enumerate(zip(f_out, q_out, strict=True)):
            f64, q64 = np.asarray(f, np.float64), np.asarray(q, np.float64)
            if f64.size == 0:
                continue
            if f64.shape != q64.shape:
                raise QuantizationError(
                    f"output {names[i]!r} has shape {list(q64.shape)} in the quantized model, "
                    f"{list(f64.shape)} in the float one"
                )
            sums_i = sums.setdefault(i, _OutputSums(axes[i] if axes[i] < f64.ndim else -1))
            sums_i.add(f64, q64)
            if layout is not None and i == layout.output and f64.ndim >= 1:
                same, rows = layout.top1(f64, q64)
                agree, total = agree + same, total + rows
            if i in detection_layouts and f64.ndim >= 1:
                counted = detection_layouts[i].count(f64, q64)
                found[i] = (found[i][0] + counted[0], found[i][1] + counted[1], found[i][2] + counted[2])
    if not sums:
        raise QuantizationError("every output of the validation runs is empty")
    per_output = {names[i]: s.figures() for i, s in sums.items()}
    for i, (made, kept, extra) in found.items():
        threshold = detection_layouts[i].threshold
        if not made:
            raise QuantizationError(
                f"the float model makes no detection in output {names[i]!r} over the {len(samples)} "
                f"validation samples (no best class score >= {threshold:g}), so the detections the "
                "quantized model keeps cannot be measured: validate on samples with objects in "
                "them, or lower the --detections threshold"
            )
        out = per_output[names[i]]
        out.detection_threshold, out.detections = threshold, made
        out.detections_kept, out.detections_extra = kept / made, extra
    kept_shares = [o.detections_kept for o in per_output.values() if o.detections_kept is not None]
    return Agreement(
        samples=len(samples),
        max_abs_error=max(o.max_abs_error for o in per_output.values()),
        rel_l2_error=max(o.rel_l2_error for o in per_output.values()),
        cosine=min(o.cosine for o in per_output.values()),
        argmax_agreement=agree / total if total else None,
        per_output=per_output,
        detections_kept=min(kept_shares) if kept_shares else None,
    )


def _details(agreement: Agreement) -> dict[str, object]:
    figures: dict[str, object] = dict(agreement.as_manifest())
    figures["per_output"] = {n: o.as_manifest() for n, o in agreement.per_output.items()}
    return figures


def check_bound(agreement: Agreement, *, max_error: float, min_argmax: float | None = None,
                min_detections_kept: float = DEFAULT_MIN_DETECTIONS_KEPT) -> None:
    """Refuse when the worst relative error, the top-1 agreement or the share of detections
    kept (in any output measured for them) is past the user's bound; the message names
    every bound missed, with the figures that show it."""
    missed: list[str] = []
    loosen: list[str] = []
    if agreement.rel_l2_error > max_error:
        name = agreement.worst_output()
        worst = agreement.per_output[name]
        where = (f"channel {worst.worst_channel} along axis {worst.feature_axis}"
                 if worst.feature_axis >= 0 else "the whole tensor")
        missed.append(
            f"quantized model's relative error {agreement.rel_l2_error:.4f} exceeds the bound "
            f"{max_error:.4f} by {agreement.rel_l2_error - max_error:.4f} in output {name!r}, "
            f"{where} (that output's whole-tensor error {worst.tensor_rel_l2_error:.4f}, cosine "
            f"{worst.cosine:.4f}, max abs error {worst.max_abs_error:.4g}; {agreement.samples} "
            "samples)"
        )
        loosen.append("raise --max-error")
    if min_argmax is not None and agreement.argmax_agreement is not None and (
        agreement.argmax_agreement < min_argmax
    ):
        missed.append(
            f"quantized model agrees on the top class for {agreement.argmax_agreement:.2%} of "
            f"outputs, below the bound {min_argmax:.2%} by {min_argmax - agreement.argmax_agreement:.2%}"
        )
        loosen.append("lower --min-argmax-agreement")
    for name, out in agreement.per_output.items():
        if out.detections_kept is None or out.detections_kept >= min_detections_kept:
            continue
        kept = round(out.detections_kept * (out.detections or 0))
        missed.append(
            f"quantized model keeps {out.detections_kept:.2%} of the float model's detections in "
            f"output {name!r}, below the bound {min_detections_kept:.2%} by "
            f"{min_detections_kept - out.detections_kept:.2%} ({kept} of {out.detections} anchors "
            f"whose best class score is >= {out.detection_threshold:g} in the float model stay so with "
            f"the same top class; {out.detections_extra} new ones; that output's worst-channel error "
            f"{out.rel_l2_error:.4f}, whole-tensor error {out.tensor_rel_l2_error:.4f}; "
            f"{agreement.samples} samples)"
        )
        if "lower --min-detections-kept" not in loosen:
            loosen.append("lower --min-detections-kept")
    if missed:
        raise AccuracyBoundError(
            "; ".join(missed) + "; add calibration data, use another quantization mode, or "
            f"loosen the bound ({', '.join(loosen)})",
            **_details(agreement),
        )
