"""Quantization: static QDQ int8 (fleet.bundles.quantize, with a calibration set of synthetic
text images as PP-OCR expects) of PP-OCRv4 det and rec against the float model: file size,
median latency of one input (onnxruntime, 1 thread, the agent's options), agreement.

rec is quantized as the bundle build does (exact float rewrites first, fleet.bundles.fold) and
also without the rewrites, timed in the same alternation; det as the build ships it (without
them: with them its int8 is past the accuracy bound). Each row's note gives the spread of the
per-round ratios and what onnxruntime's optimized int8 graph still runs in float, by op type."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from bench.common import QUICK, emit, interleaved, median, ocr_model, ort_session, row, text_images
from fleet.bundles.quantize import compare, quantize

INT8_OPS = ("QLinear", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear",
            "DynamicQuantize", "QGemm", "QAttention")
SHAPE_OPS = {"Shape", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Concat", "Gather",
             "Cast", "Constant", "Identity", "Flatten"}


def float_ops(model: Path, work: Path) -> str:
    """Op types of the optimized int8 graph (ORT_ENABLE_ALL, as the agent runs it) that compute
    in float: not int8 kernels, not Q/DQ, not shape plumbing."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(work / f"{model.stem}.opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    qk = {k: v for k, v in ops.items() if k.startswith(INT8_OPS) and "Quantize" not in k}
    q = sum(qk.values())
    qtop = ", ".join(f"{k} {v}" for k, v in sorted(qk.items(), key=lambda kv: -kv[1]))
    qdq = sum(v for k, v in ops.items() if "QuantizeLinear" in k)
    fl = {k: v for k, v in ops.items() if not k.startswith(INT8_OPS) and k not in SHAPE_OPS}
    top = ", ".join(f"{k} {v}" for k, v in sorted(fl.items(), key=lambda kv: -kv[1]))
    return f"int8 kernels {q} ({qtop}), Q/DQ {qdq}, float compute {sum(fl.values())} ({top})"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    rows = []
    cases = [("rec", 48, 320, 4), ("det", 320, 320, 4)]
    for kind, h, w, n_cal in cases:
        src = ocr_model(kind)
        cal = text_images(n_cal, h, w)
        val = text_images(2 if QUICK else 4, h, w, seed=1)
        variants = {"i8": True, "i8 plain": False} if kind == "rec" else {"i8": False}
        models: dict[str, Path] = {}
        done: dict[str, dict[str, int]] = {}
        for name, fold in variants.items():
            models[name] = work / f"{kind}.{name.replace(' ', '_')}.int8.onnx"
            done[name] = quantize(src, models[name], "static", cal, fold=fold)
        agreement = compare(src, models["i8"], val, class_scores=0 if kind == "rec" else None).as_manifest()
        sessions = {"f32": ort_session(src)} | {k: ort_session(p) for k, p in models.items()}
        x = val[0]
        rounds, per_round = (3, 3) if QUICK else (8, 5)
        t = interleaved({k: lambda s=s, x=x: s.run(None, x) for k, s in sessions.items()},
                        rounds=rounds, per_round=per_round, warmup=2)
        figures = ", ".join(f"{k} {v:.3g}" for k, v in agreement.items() if isinstance(v, float | int))
        size_f, size_i = src.stat().st_size / 2**20, models["i8"].stat().st_size / 2**20
        rows.append(row(f"quantization size (PP-OCRv4 {kind})", size_i, size_f, "MB", "<= 0.35x",
                        note=f"static QDQ int8; agreement on {len(val)} synthetic inputs: {figures}"))
        for name in models:
            per = [median(t[name][r * per_round:(r + 1) * per_round])
                   / median(t["f32"][r * per_round:(r + 1) * per_round]) for r in range(rounds)]
            label = "" if name == "i8" else ", without the float rewrites"
            rows.append(row(
                f"quantization latency (PP-OCRv4 {kind} 1x3x{h}x{w}{label})", median(t[name]) * 1000,
                median(t["f32"]) * 1000, "ms median", "<= 0.8x",
                note=(f"onnxruntime CPU EP, 1 thread, int8 QDQ vs float; "
                      f"float rewrites {done[name] or 'none'}; "
                      f"per-round ratio {min(per):.3f}..{max(per):.3f} over {rounds} rounds; "
                      f"optimized int8 graph: {float_ops(models[name], work)}")))
    emit(rows)


if __name__ == "__main__":
    main()
