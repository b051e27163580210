"""Build a signed single-file bundle from an ONNX model.

The builder reads the model's signature with onnxruntime, makes golden vectors by
running the model on the given (or generated) inputs, records baseline input
statistics for drift, signs the manifest with the keyring's delegated keys, and
writes the archive atomically. Quantization deepens this step later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.bundles.quantize import (
    DEFAULT_MIN_DETECTIONS_KEPT,
    MODES,
    AccuracyBoundError,
    ClassScores,
    QuantizationError,
    Sample,
    check_bound,
    compare,
    parse_class_scores,
    parse_detections,
    quantize,
)
from fleet.bundles.runners import open_model, tflite_quantization
from fleet.bundles.specialise import fixed_arrays, specialise
from shared.bundle.archive import write_bundle
from shared.bundle.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_MIN_CHUNKED_FILE, choose_chunk_size, hash_chunks
from shared.bundle.keyring import Keyring, sign_manifest
from shared.bundle.manifest import SCHEMA, FileRef, Manifest, Quantization, TensorSpec, Tolerance
from shared.bundle.trust import TrustRoot, VerifiedManifest
from shared.errors import MalformedDocumentError
from shared.timeutil import format_ts, in_days, utcnow

log = logging.getLogger(__name__)

ONNX_MEDIA_TYPE = "application/vnd.onnx"
TFLITE_MEDIA_TYPE = "application/vnd.tflite"
NPZ_MEDIA_TYPE = "application/x-npz"
JSON_MEDIA_TYPE = "application/json"


def _file_ref(path: Path, media_type: str, *, chunk_size: int | None = None,
              chunk_min_bytes: int = DEFAULT_MIN_CHUNKED_FILE) -> FileRef:
    """The manifest entry of a file; with ``chunk_size``, files of at least ``chunk_min_bytes``
    also list their chunk hashes (the chunk size doubles for very large files)."""
    size = path.stat().st_size
    if chunk_size is not None and size >= chunk_min_bytes:
        effective = choose_chunk_size(size, chunk_size)
        sha, chunks = hash_chunks(path, effective)
        return FileRef(sha256=sha, size=size, media_type=media_type, chunk_size=effective, chunks=chunks)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return FileRef(sha256=digest.hexdigest(), size=size, media_type=media_type)


def sample_inputs(specs: list[TensorSpec], *, batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped from the signature (dynamic axes -> ``batch`` for the first, 1 after)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [
            dim if isinstance(dim, int) else (batch if axis == 0 else 1)
            for axis, dim in enumerate(spec.shape)
        ]
        if spec.dtype.startswith("float"):
            out[spec.name] = rng.random(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            out[spec.name] = rng.random(shape) > 0.5
        else:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return out


def input_baseline(samples: list[Sample]) -> dict[str, object]:
    """Per-input quantiles and moments: a few hundred bytes each, for drift on the device."""
    stats: dict[str, object] = {}
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    for name in samples[0]:
        flat = np.concatenate([np.asarray(s[name], dtype=np.float64).ravel() for s in samples])
        stats[name] = {
            "count": int(flat.size),
            "mean": float(flat.mean()) if flat.size else 0.0,
            "std": float(flat.std()) if flat.size else 0.0,
            "quantiles": dict(zip([str(q) for q in qs], np.quantile(flat, qs).tolist(), strict=True))
            if flat.size
            else {},
        }
    return {"schema": "edgefleet.baseline/v1", "inputs": stats}


def _class_score_output(outputs: list[TensorSpec]) -> int | None:
    """The first output whose last axis is a fixed number of classes (> 1), if any."""
    for i, spec in enumerate(outputs):
        if len(spec.shape) >= 2 and isinstance(spec.shape[-1], int) and spec.shape[-1] > 1:
            return i
    return None


def build_bundle(
    model_path: Path,
    *,
    name: str,
    version: str,
    release: int,
    keyring: Keyring,
    out: Path,
    golden_inputs: dict[str, np.ndarray] | None = None,
    quantization: str = "none",
    calibration: list[Sample] | None = None,
    validation: list[Sample] | None = None,
    max_error: float = 0.05,
    min_argmax_agreement: float | None = None,
    class_scores: str | None = None,
    detections: list[str] | None = None,
    min_detections_kept: float = DEFAULT_MIN_DETECTIONS_KEPT,
    fixed_inputs: dict[str, str] | None = None,
    signing_keys: list[Ed25519PrivateKey] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    expires_days: float = 90,
    min_agent_version: str = "0.1.0",
    description: str = "",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    chunk_min_bytes: int = DEFAULT_MIN_CHUNKED_FILE,
) -> VerifiedManifest:
    """Write a signed bundle for an ONNX or TFLite model to ``out``; return its verified manifest.

    TFLite models are taken as converted: their quantization is read and recorded.
    With ``quantization`` "dynamic" or "static" the bundled model is the int8 one, measured
    against the float model on ``validation`` (else ``calibration``, else the golden inputs);
    past ``max_error`` (relative L2 error, worst channel of any output) or below
    ``min_argmax_agreement`` (top-1 agreement over the class axis: ``class_scores``
    "OUTPUT[:AXIS[:FIRST]]", else the first ``detections`` layout, else the last axis of the
    first output with a fixed one) or below ``min_detections_kept`` (in each output that
    ``detections`` "OUTPUT[:AXIS[:FIRST[:THRESHOLD]]]" names: the share of the float model's
    detections, anchors whose best class score is at least THRESHOLD, that the int8 model
    keeps with the same top class) the build refuses with AccuracyBoundError.
    ``fixed_inputs`` (name -> value of a scalar input, ``--fix-input sr=16000``) specialises
    an ONNX graph on those values (fleet.bundles.specialise) before quantizing; the manifest
    records them and the device refuses other values.
    ``signing_keys`` picks a delegation's keys (default: the keyring's "online" ones).
    A model file of at least ``chunk_min_bytes`` lists the SHA-256 of its ``chunk_size`` chunks
    so that devices fetch only the chunks they lack; ``chunk_size=None`` leaves chunks out
    (for fleets whose agents predate chunks: they refuse a manifest that lists them).
    """
    if quantization not in MODES:
        raise MalformedDocumentError(f"quantization {quantization!r} must be one of {MODES}")
    model_path = Path(model_path)
    float_runner = open_model(model_path)
    inputs, outputs = float_runner.inputs, float_runner.outputs
    if float_runner.runtime == "litert" and quantization != "none":
        raise MalformedDocumentError(
            "TFLite models are taken as converted; quantize them in the TFLite converter "
            "and build with --quantize none"
        )

    def cast(sample: dict[str, np.ndarray], what: str) -> Sample:
        missing = {s.name for s in inputs} - set(sample)
        if missing:
            raise MalformedDocumentError(f"{what} lack inputs {sorted(missing)}")
        return {s.name: np.asarray(sample[s.name]).astype(s.dtype) for s in inputs}

    calibration = [cast(x, "calibration samples") for x in calibration or []]
    validation = [cast(x, "validation samples") for x in validation or []]
    if quantization == "static" and not calibration:
        raise QuantizationError("static quantization needs a calibration set (--calibration FILE.npz)")
    detection_layouts = [parse_detections(text, outputs) for text in detections or []]
    repeated = {outputs[d.output].name for d in detection_layouts
                if [e.output for e in detection_layouts].count(d.output) > 1}
    if repeated:
        raise MalformedDocumentError(f"--detections names output(s) {sorted(repeated)} more than once")
    layout: ClassScores | int | None
    if class_scores:
        layout = parse_class_scores(class_scores, outputs)
    elif detection_layouts:
        first = detection_layouts[0]
        layout = ClassScores(first.output, first.axis, first.first)
    else:
        layout = _class_score_output(outputs)
    fixed = fixed_arrays(fixed_inputs, inputs) if fixed_inputs else {}
    if fixed and float_runner.runtime == "litert":
        raise MalformedDocumentError(
            "--fix-input specialises ONNX graphs; TFLite models are taken as converted"
        )
    if golden_inputs is not None:
        feeds = cast(golden_inputs, "golden inputs")
    elif validation:
        feeds = validation[0]
    elif calibration:
        feeds = calibration[0]
    else:
        feeds = {**sample_inputs(inputs), **fixed}
        try:
            float_runner.run(feeds)
        except Exception as exc:
            made = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise MalformedDocumentError(
                f"the model fails on inputs made from its signature ({made}; dynamic axes set to "
                f"4 for the first, 1 after): {exc}. Give inputs it accepts with --golden FILE.npz "
                "(one feed keyed by input name) or --validation FILE.npz"
            ) from None
    for what, group in (("golden inputs", [feeds]), ("calibration samples", calibration),
                        ("validation samples", validation)):
        for sample in group:
            for fixed_name, value in fixed.items():
                if not np.array_equal(sample[fixed_name], value):
                    raise MalformedDocumentError(
                        f"{what}: input {fixed_name!r} is {np.asarray(sample[fixed_name]).tolist()!r} "
                        "but the build "
                        f"fixes it to {value.item()!r} (--fix-input); give samples at that value"
                    )

    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        tmpdir = Path(tmp)
        quant = (
            tflite_quantization(model_path) if float_runner.runtime == "litert" else Quantization(mode="none")
        )
        source_path = model_path
        if fixed:
            specialised = tmpdir / "model.fixed.onnx"
            folded = specialise(model_path, specialised, fixed)
            log.info("specialised on %s: %s", fixed_inputs, folded)
            model_path = specialised
            float_runner = open_model(model_path)
        runner = float_runner
        if quantization != "none":
            int8_path = tmpdir / "model.int8.onnx"
            rewrites = quantize(model_path, int8_path, quantization, calibration)
            agreement = compare(
                source_path, int8_path, validation or calibration or [feeds],
                class_scores=layout, detections=detection_layouts,
            )
            try:
                check_bound(agreement, max_error=max_error, min_argmax=min_argmax_agreement,
                            min_detections_kept=min_detections_kept)
            except AccuracyBoundError as exc:
                if not rewrites:
                    raise
                # exact in float, yet they can move where the quantizer puts its ranges (PP-OCRv4
                # det: 0.03 -> 0.57 relative error with both): quantize the graph as it was
                log.warning("int8 after float rewrites %s is past the bound (%s); quantizing without",
                            rewrites, exc)
                rewrites = quantize(model_path, int8_path, quantization, calibration, fold=False)
                agreement = compare(
                    source_path, int8_path, validation or calibration or [feeds],
                    class_scores=layout, detections=detection_layouts,
                )
                check_bound(agreement, max_error=max_error, min_argmax=min_argmax_agreement,
                            min_detections_kept=min_detections_kept)
            figures = agreement.as_manifest()
            for out_name, per in agreement.per_output.items():
                figures.update({f"output.{out_name}.{k}": v for k, v in per.as_manifest().items()})
            figures["size_ratio"] = int8_path.stat().st_size / source_path.stat().st_size
            # exact float rewrites made before quantizing (fleet.bundles.fold), as counts
            figures.update({f"rewrite.{k}": float(v) for k, v in rewrites.items()})
            quant = Quantization(mode=quantization, weight_dtype="int8", agreement=figures)
            model_path = int8_path
            runner = open_model(model_path)
        try:
            results = runner.run(feeds)
        except Exception as exc:
            raise MalformedDocumentError(f"the model fails on its golden inputs: {exc}") from None
        golden_path = tmpdir / "golden.npz"
        arrays = {f"in.{k}": v for k, v in feeds.items()}
        arrays.update({f"out.{spec.name}": r for spec, r in zip(outputs, results, strict=True)})
        with open(golden_path, "wb") as fh:
            np.savez(fh, **arrays)
        baseline_path = tmpdir / "baseline.json"
        baseline_path.write_text(json.dumps(input_baseline(validation or [feeds]), sort_keys=True))

        paths = {"model": model_path, "golden": golden_path, "baseline": baseline_path}
        model_media = TFLITE_MEDIA_TYPE if runner.runtime == "litert" else ONNX_MEDIA_TYPE
        media = {"model": model_media, "golden": NPZ_MEDIA_TYPE, "baseline": JSON_MEDIA_TYPE}
        files = {
            role: _file_ref(path, media[role], chunk_size=chunk_size if role == "model" else None,
                            chunk_min_bytes=chunk_min_bytes)
            for role, path in paths.items()
        }
        manifest = Manifest(
            schema=SCHEMA,
            name=name,
            release=release,
            version=version,
            created=format_ts(utcnow()),
            expires=in_days(expires_days),
            runtime=runner.runtime,
            quantization=quant,
            min_agent_version=min_agent_version,
            inputs=inputs,
            outputs=outputs,
            files=files,
            golden_tolerance=Tolerance(atol=atol, rtol=rtol),
            description=description,
            fixed_inputs={k: v.item() for k, v in fixed.items()} or None,
        ).validate()
        envelope = sign_manifest(manifest, signing_keys or keyring.signing_keys)
        write_bundle(Path(out), envelope, {files[r].sha256: p for r, p in paths.items()})
    return TrustRoot.load(keyring.root_path.read_bytes()).verify_manifest(envelope)
