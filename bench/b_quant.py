"""Quantization: static QDQ int8 (fleet.bundles.quantize, with a calibration set of synthetic
text images as PP-OCR expects) of PP-OCRv4 det and rec against the float model: file size,
median latency of one input (onnxruntime, 1 thread, the agent's options), agreement."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import QUICK, emit, interleaved, median, ocr_model, ort_session, row, text_images
from fleet.bundles.quantize import compare, quantize


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    rows = []
    cases = [("rec", 48, 320, 4), ("det", 320, 320, 4)]
    for kind, h, w, n_cal in cases:
        src = ocr_model(kind)
        dst = work / f"{kind}.int8.onnx"
        cal = text_images(n_cal, h, w)
        quantize(src, dst, "static", cal)
        val = text_images(2 if QUICK else 4, h, w, seed=1)
        agreement = compare(src, dst, val, class_scores=0 if kind == "rec" else None).as_manifest()
        f32, i8 = ort_session(src), ort_session(dst)
        x = val[0]
        t = interleaved({"f32": lambda s=f32, x=x: s.run(None, x), "i8": lambda s=i8, x=x: s.run(None, x)},
                        rounds=3 if QUICK else 6, per_round=3 if QUICK else 5, warmup=2)
        figures = ", ".join(f"{k} {v:.3g}" for k, v in agreement.items() if isinstance(v, float | int))
        size_f, size_i = src.stat().st_size / 2**20, dst.stat().st_size / 2**20
        rows.append(row(f"quantization size (PP-OCRv4 {kind})", size_i, size_f, "MB", "<= 0.35x",
                        note=f"static QDQ int8; agreement on {len(val)} synthetic inputs: {figures}"))
        rows.append(row(f"quantization latency (PP-OCRv4 {kind} 1x3x{h}x{w})", median(t["i8"]) * 1000,
                        median(t["f32"]) * 1000, "ms median", "<= 0.8x",
                        note="onnxruntime CPU EP, 1 thread, int8 QDQ vs float"))
    emit(rows)


if __name__ == "__main__":
    main()
