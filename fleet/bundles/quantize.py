"""ONNX int8 quantization with the pre-processing real exported models need, and a
measured comparison of the quantized model against the float one.

Steps (each learnt on models that PyPI packages ship):
- opset below 13 is converted up: QDQ's per-channel DequantizeLinear needs opset 13;
- ``quant_pre_process`` (optimisation + shape inference); symbolic shape inference
  fails on some graphs (PP-OCR), so it falls back to ONNX shape inference only;
- dynamic int8 for MatMul/RNN-heavy models, static QDQ int8 with a calibration set
  for CNNs;
- the quantized model runs beside the float one on the validation samples and the
  agreement is measured; the build refuses when it is past the user's bound.
All temporary files live in a private directory (the pre-processor writes to cwd).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shared.bundle.manifest import TensorSpec
from shared.errors import EdgefleetError, MalformedDocumentError

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13
MODES = ("none", "dynamic", "static")
RMS_FLOOR = 1e-3

Sample = dict[str, np.ndarray]


class QuantizationError(EdgefleetError):
    code = "quantization"


class AccuracyBoundError(QuantizationError):
    """The quantized model disagrees with the float one past the user's bound."""

    code = "accuracy_bound"


@dataclass
class Agreement:
    """How closely the quantized model follows the float one on the validation set."""

    samples: int
    max_abs_error: float
    # ||q - f|| / max(||f||, RMS_FLOOR * sqrt(n)), worst output: relative, but near-zero
    # outputs (an empty detection map) do not turn a tiny absolute error into a huge one.
    rel_l2_error: float
    cosine: float  # worst output
    argmax_agreement: float | None  # for class-score outputs (last axis > 1)

    def as_manifest(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


def split_samples(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], what: str) -> list[Sample]:
    """Split arrays keyed by input name into samples.

    An array with one more axis than its input stacks samples on a new first axis
    (``a[i]``: state tensors, scalars); an array with the input's own rank holds rows on
    the batch axis (``a[i:i+1]``: a dataset of images for a [batch, C, H, W] input).
    """
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise MalformedDocumentError(
            f"{what} lack arrays for inputs {missing}; they have {sorted(arrays)}"
        )
    per_input: dict[str, Callable[[int], np.ndarray]] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        arr = arrays[spec.name]
        if arr.ndim == len(spec.shape) + 1:
            counts[spec.name] = arr.shape[0]
            per_input[spec.name] = lambda i, a=arr: a[i]
        elif arr.ndim == len(spec.shape) and arr.ndim > 0:
            counts[spec.name] = arr.shape[0]
            per_input[spec.name] = lambda i, a=arr: a[i : i + 1]
        else:
            raise MalformedDocumentError(
                f"{what}: input {spec.name!r} has rank {len(spec.shape)}, its array has shape "
                f"{arr.shape} (give rows on the batch axis, or samples stacked on a new first axis)"
            )
    if len(set(counts.values())) != 1 or not next(iter(counts.values()), 0):
        raise MalformedDocumentError(f"{what}: every input needs the same number of samples, got {counts}")
    n = next(iter(counts.values()))
    return [{name: take(i) for name, take in per_input.items()} for i in range(n)]


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


def quantize(src: Path, dst: Path, mode: str, calibration: list[Sample] | None = None) -> None:
    """Write an int8 model of ``src`` to ``dst``."""
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
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        workdir = Path(tmp)
        pre = prepare(Path(src), workdir)
        with _in_directory(workdir):
            try:
                if mode == "dynamic":
                    quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
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
            "onnxruntime's quantizer does not reach (e.g. inside If/Loop subgraphs). Bundle it "
            "unquantized (--quantize none) or export a graph without control flow"
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


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(
    float_model: Path, quant_model: Path, samples: list[Sample], *, class_scores: int | None = 0
) -> Agreement:
    """Run both models on every sample and measure how far the quantized one strays.

    ``class_scores`` is the index of the output holding class scores on its last axis
    (its argmax agreement is measured), or None when no output is such.
    """
    if not samples:
        raise QuantizationError("the validation set is empty")
    f_sess, q_sess = _session(float_model), _session(quant_model)
    max_abs = 0.0
    diff_sq: dict[int, float] = {}
    ref_sq: dict[int, float] = {}
    dots: dict[int, float] = {}
    q_sq: dict[int, float] = {}
    count: dict[int, int] = {}
    agree = total = 0
    for sample in samples:
        f_out = f_sess.run(None, sample)
        q_out = q_sess.run(None, sample)
        for i, (f, q) in enumerate(zip(f_out, q_out, strict=True)):
            f64, q64 = np.asarray(f, np.float64), np.asarray(q, np.float64)
            if f64.size == 0:
                continue
            d = q64 - f64
            max_abs = max(max_abs, float(np.abs(d).max()))
            diff_sq[i] = diff_sq.get(i, 0.0) + float((d * d).sum())
            ref_sq[i] = ref_sq.get(i, 0.0) + float((f64 * f64).sum())
            q_sq[i] = q_sq.get(i, 0.0) + float((q64 * q64).sum())
            dots[i] = dots.get(i, 0.0) + float((f64 * q64).sum())
            count[i] = count.get(i, 0) + f64.size
            if i == class_scores and f64.ndim >= 2 and f64.shape[-1] > 1:
                agree += int((f64.argmax(-1) == q64.argmax(-1)).sum())
                total += int(np.prod(f64.shape[:-1]))
    rel = max(
        np.sqrt(diff_sq[i]) / max(np.sqrt(ref_sq[i]), RMS_FLOOR * np.sqrt(count[i])) for i in diff_sq
    )
    cos = min(dots[i] / max(np.sqrt(ref_sq[i] * q_sq[i]), 1e-12) for i in dots)
    return Agreement(
        samples=len(samples),
        max_abs_error=max_abs,
        rel_l2_error=float(rel),
        cosine=float(cos),
        argmax_agreement=agree / total if total else None,
    )


def check_bound(agreement: Agreement, *, max_error: float, min_argmax: float | None = None) -> None:
    """Refuse when the relative error (or argmax agreement) is past the user's bound."""
    if agreement.rel_l2_error > max_error:
        raise AccuracyBoundError(
            f"quantized model's relative error {agreement.rel_l2_error:.4f} exceeds the bound "
            f"{max_error:.4f} by {agreement.rel_l2_error - max_error:.4f} "
            f"(cosine {agreement.cosine:.4f}, max abs error {agreement.max_abs_error:.4g}, "
            f"{agreement.samples} samples); raise --max-error, add calibration data, or use "
            "another quantization mode",
            **asdict(agreement),
        )
    if min_argmax is not None and agreement.argmax_agreement is not None and (
        agreement.argmax_agreement < min_argmax
    ):
        raise AccuracyBoundError(
            f"quantized model agrees on the top class for {agreement.argmax_agreement:.2%} of "
            f"outputs, below the bound {min_argmax:.2%} by {min_argmax - agreement.argmax_agreement:.2%}",
            **asdict(agreement),
        )
