"""Shadow evaluation: the latency applications see with a candidate in shadow against none.

In process, like b_inference: ModelHost.predict (the agent's whole request path) on the
3-layer 2048-wide MLP (a few ms per run, so the candidate's runs cost real CPU), one
onnxruntime thread per session. Two paced clients (an application at a fixed request rate,
not a flood) send requests; blocks with the shadow off and on (sample rate 0.2, CPU budget
0.25 of wall time, the defaults an operator would start with) alternate so noise hits both.
The candidate is a second session of the same model. Reported: p50 and p95 of the
applications' latency, on vs off, and what the shadow compared and dropped.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from agent.runtime.batching import BatchPolicy
from agent.runtime.host import LoadedModel, ModelHost
from agent.runtime.onnx_backend import OnnxBackend
from agent.runtime.shadow import ShadowPolicy, ShadowRunner
from bench.common import QUICK, bench_model, build, emit, keyring, pct, row

RATE_HZ = 60.0  # per client
CLIENTS = 2
BLOCK_S = 1.5 if QUICK else 3.0
ROUNDS = 3 if QUICK else 8
POLICY = ShadowPolicy(sample_rate=0.2, max_busy_fraction=0.25)


def _client(host: ModelHost, name: str, sample: dict[str, object], until: float, out: list[float]) -> None:
    period = 1.0 / RATE_HZ
    next_at = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now >= until:
            return
        if now < next_at:
            time.sleep(next_at - now)
        t0 = time.perf_counter()
        host.predict(name, sample)  # type: ignore[arg-type]
        out.append(time.perf_counter() - t0)
        next_at += period


def _block(host: ModelHost, name: str, sample: dict[str, object], out: list[float]) -> None:
    until = time.perf_counter() + BLOCK_S
    threads = [threading.Thread(target=_client, args=(host, name, sample, until, out))
               for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    model, sample = bench_model("mlp", work)
    vm = build(model, "mlp", sample, keyring(work / "keys"), work / "mlp.bundle", atol=1e-2, rtol=1e-2)
    backend = OnnxBackend(intra_op_threads=1)
    host = ModelHost(BatchPolicy())
    host.swap(LoadedModel(vm.manifest, 1, vm.digest, backend.load(model, vm.manifest)))
    candidate = LoadedModel(vm.manifest, 2, "c" * 64, backend.load(model, vm.manifest))
    off: list[float] = []
    on: list[float] = []
    compared = dropped = 0
    busy: list[float] = []
    for _ in range(5):
        host.predict("mlp", sample)  # type: ignore[arg-type]
    for _ in range(ROUNDS):
        _block(host, "mlp", sample, off)
        runner = ShadowRunner(candidate, POLICY)
        host.set_shadow("mlp", runner)
        _block(host, "mlp", sample, on)
        runner.wait_idle(10)
        h = runner.health()
        compared += h.samples
        dropped += h.dropped_queue + h.dropped_budget
        busy.append(h.busy_fraction or 0.0)
        host.clear_shadow("mlp")
    host.close()
    note = (f"{CLIENTS} clients x {RATE_HZ:g} req/s, sample rate {POLICY.sample_rate}, CPU budget "
            f"{POLICY.max_busy_fraction}; {compared} samples compared, {dropped} dropped, shadow worker "
            f"busy {max(busy):.1%} of wall time at most; {len(on)} + {len(off)} requests")
    rows = [
        row("shadow on vs off: app latency p50 (MLP 3x2048)", pct(on, 50) * 1000, pct(off, 50) * 1000,
            "ms", "<= 1.15x", note=note),
        row("shadow on vs off: app latency p95 (MLP 3x2048)", pct(on, 95) * 1000, pct(off, 95) * 1000,
            "ms", "<= 1.25x", note=note),
    ]
    print(f"shadow on/off latency ratio: p50 {rows[0].ratio:.3f}, p95 {rows[1].ratio:.3f} ({note})")
    emit(rows)


if __name__ == "__main__":
    main()
