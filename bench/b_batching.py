"""Dynamic batching: requests per second with 16 concurrent keep-alive clients over the
Unix socket (.npy), batching on (max_batch_size 8, max_queue_delay_ms 2) against off
(max_batch_size 1), same agent, same model, same workers (auto: 2 on 2 cores).

The clients are 4 processes x 4 threads, each thread on its own connection.
"""

from __future__ import annotations

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


def throughput(kind: str, work: Path, x: np.ndarray, runtime: dict[str, object]) -> float:
    prep = prepare_agent(kind, work, runtime=runtime)
    proc = start_agent(prep.config, work / "agent.log")
    try:
        wait_ready(prep.socket, proc=proc)
        body = npy_bytes(x)
        warm = UnixHttp(prep.socket)
        for _ in range(5):
            warm.request("POST", f"/v1/models/{kind}/predict", body, {"Content-Type": "application/x-npy"})
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
        return total / (DURATION_S + 1.0)
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
        on = throughput(kind, work / f"{kind}-on", x, {"max_batch_size": 8, "max_queue_delay_ms": 2.0})
        off = throughput(kind, work / f"{kind}-off", x, {"max_batch_size": 1})
        rows.append(row(f"dynamic batching ({label})", on, off, "req/s", ">= 1.5x",
                        note="16 keep-alive clients (4 procs x 4 threads) on the Unix socket; "
                        "on: max_batch_size 8, delay 2 ms; off: max_batch_size 1; workers auto"))
    emit(rows)


if __name__ == "__main__":
    main()
