"""In-process inference: the agent's predict path (ModelHost.predict: the signature check,
drift sampling, the scheduler's inline run and metrics) against a raw ``session.run`` of the
same onnxruntime options on the same input (the public InferenceSession.run, as an
application would call it); medians, alternated in blocks. Targets: within 5 % on a real
model, 1.5x on a tiny one (a few us of Python per request is what is left to see)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from agent.runtime.batching import BatchPolicy
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from bench.common import QUICK, bench_model, build, emit, interleaved, keyring, median, ort_session, row


def measure(kind: str, work: Path) -> tuple[float, float]:
    model, sample = bench_model(kind, work)
    vm = build(model, kind, sample, keyring(work / "keys"), work / f"{kind}.bundle", atol=1e-2, rtol=1e-2)
    session = OnnxBackend(intra_op_threads=1).load(model, vm.manifest)
    host = ModelHost(BatchPolicy())
    host.swap(LoadedModel(vm.manifest, 1, vm.digest, session))
    raw = ort_session(model)
    out_names = [o.name for o in raw.get_outputs()]
    heavy = kind in ("rec", "det")
    times = interleaved(
        {"ours": lambda: host.predict(kind, sample), "raw": lambda: raw.run(out_names, sample)},
        rounds=5 if QUICK else 10, per_round=(4 if heavy else 200) if QUICK else (10 if heavy else 500),
    )
    host.close()
    return median(times["ours"]), median(times["raw"])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    rows = []
    for kind, label, target in (("rec", "PP-OCRv4 rec 1x3x48x320", "<= 1.05x"),
                                ("clf", "demo classifier 1x4", "<= 1.5x")):
        ours, raw = measure(kind, work)
        overhead_us = (ours - raw) * 1e6
        rows.append(row(f"in-process inference ({label})", ours * 1000, raw * 1000, "ms median", target,
                        note=f"ModelHost.predict vs session.run; overhead {overhead_us:.0f} us per request"))
    emit(rows)


if __name__ == "__main__":
    main()
