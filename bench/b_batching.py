"""Dynamic batching: requests per second with 16 concurrent keep-alive clients over the
Unix socket (.npy), same agent, same model, same workers (auto: 2 on 2 cores):

- auto (the default: ``runtime.batching = "auto"``, max_batch_size 8, max_queue_delay_ms 2):
  the agent's load-time calibration decides per model (agent.runtime.batch_gain); the row
  says what it decided (GET /v1/models) and must be >= 1.0x of off;
- on (``batching = "on"``, same size and delay): merging forced, whatever it costs;
- off (max_batch_size 1), run twice, before and after the others: their spread is the
  machine's noise, within which auto counts as not slower when it decided "off" itself.

The clients are 4 processes x 4 threads, each thread on its own connection.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import QUICK, UnixHttp, emit, npy_bytes, prepare_agent, row, start_agent, stop, wait_ready

DURATION_S = 4.0 if QUICK else 12.0
PROCS, THREADS = 4, 4


def _client_proc(sock: str, path: str, body: bytes, until: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    counts = [0] * THREADS

    def loop(i: int) -> None:
        c = UnixHttp(Path(sock))
        while time.time() < until:
            status, _, _ = c.request("POST", path, body, {"Content-Type": "application/x-npy"})
            if status == 200:
                counts[i] += 1
        c.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(counts))


def throughput(kind: str, work: Path, x: np.ndarray, runtime: dict[str, object]) -> tuple[float, dict]:  # type: ignore[type-arg]
    prep = prepare_agent(kind, work, runtime=runtime)
    proc = start_agent(prep.config, work / "agent.log")
    try:
        wait_ready(prep.socket, proc=proc)
        body = npy_bytes(x)
        warm = UnixHttp(prep.socket)
        for _ in range(5):
            warm.request("POST", f"/v1/models/{kind}/predict", body, {"Content-Type": "application/x-npy"})
        _, _, models = warm.request("GET", "/v1/models")
        batching = json.loads(models)["models"][0]["batching"]
        warm.close()
        q: mp.Queue[int] = mp.Queue()
        start = time.time() + 1.0
        until = start + DURATION_S
        ps = [mp.Process(target=_client_proc, args=(str(prep.socket), f"/v1/models/{kind}/predict", body,
                                                    until, q)) for _ in range(PROCS)]
        for p in ps:
            p.start()
        total = sum(q.get(timeout=DURATION_S + 60) for _ in ps)
        for p in ps:
            p.join()
        # the clients start at once and count until ``until``; connection setup is in the count
        return total / (DURATION_S + 1.0), batching
    finally:
        stop(proc)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    rows = []
    rng = np.random.default_rng(0)
    cases = [("mlp", "MLP 3x2048 dense, 1x256", rng.random((1, 256), np.float32))]
    if not QUICK:
        cases.append(("rec", "PP-OCRv4 rec 1x3x48x160", rng.random((1, 3, 48, 160), np.float32)))
    for kind, label, x in cases:
        auto_cfg = {"max_batch_size": 8, "max_queue_delay_ms": 2.0}
        off1, _ = throughput(kind, work / f"{kind}-off1", x, {"max_batch_size": 1})
        auto, decided = throughput(kind, work / f"{kind}-auto", x, auto_cfg)
        on, _ = throughput(kind, work / f"{kind}-on", x, {**auto_cfg, "batching": "on"})
        off2, _ = throughput(kind, work / f"{kind}-off2", x, {"max_batch_size": 1})
        off = (off1 + off2) / 2
        noise = abs(off1 - off2) / off
        cal = decided.get("calibration") or {}
        what = (f"auto decided: batching {'on' if decided['enabled'] else 'off'} (calibration gain "
                f"{cal.get('gain', '?')}x at {cal.get('rows', '?')} rows)")
        rows.append(row(f"dynamic batching auto vs off ({label})", auto, off, "req/s", ">= 1.0x",
                        met=auto / off >= 1.0 - noise,
                        note=f"{what}; off {off1:.1f} and {off2:.1f} req/s (noise {noise:.1%}, within "
                        "which a ratio below 1 counts as equal); 16 keep-alive clients on the Unix socket"))
        rows.append(row(f"dynamic batching forced on vs off ({label})", on, off, "req/s", "",
                        note="runtime.batching = on: merging whatever the calibration says (what auto "
                        "avoids where it does not pay); max_batch_size 8, delay 2 ms"))
    emit(rows)


if __name__ == "__main__":
    main()
