"""Local API latency: p50 of a predict over the agent's Unix socket (1x3x224x224 float32 in,
a small CNN) against a raw ``session.run`` of the same model on the same input, in the same
run. The target is on the difference (the API's overhead), not the ratio.

Rows: the default path (``AgentClient()`` as an application calls it: raw tensors both
ways), then each framing through the same client (raw tensors + shape header, .npy, .npz,
JSON) so users can choose, then the same .npy request from a minimal keep-alive client and
a bare stdlib http.server echo (where the time of the HTTP exchange itself goes).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.client import AgentClient
from bench.common import (
    QUICK,
    UnixHttp,
    agent_env,
    agent_python,
    emit,
    median,
    npy_bytes,
    ort_session,
    pct,
    prepare_agent,
    row,
    start_agent,
    stop,
    wait_ready,
)

N = 150 if QUICK else 600
N_JSON = 15 if QUICK else 45  # a JSON body of 150,528 numbers takes tens of ms each way
TARGET_MS = 0.5


def timed(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    prep = prepare_agent("cnn224", work / "cnn224")
    x = prep.sample["x"]
    raw = ort_session(prep.model)
    out_names = [o.name for o in raw.get_outputs()]
    proc = start_agent(prep.config, work / "agent.log")
    rows = []
    floor = None
    try:
        wait_ready(prep.socket, proc=proc)
        conn = UnixHttp(prep.socket)
        path = "/v1/models/cnn224/predict"
        npy = npy_bytes(x)
        client = AgentClient(unix_socket=str(prep.socket))
        floor_sock = work / "floor.sock"
        floor = subprocess.Popen([str(agent_python()), "-m", "bench.floor_server", str(floor_sock)],
                                 env=agent_env())
        for _ in range(200):
            if floor_sock.exists():
                break
            time.sleep(0.02)
        fconn = UnixHttp(floor_sock)

        def minimal_npy() -> None:
            status, _, _ = conn.request("POST", path, npy, {"Content-Type": "application/x-npy"})
            assert status == 200

        def floor_npy() -> None:
            status, _, _ = fconn.request("POST", path, npy, {"Content-Type": "application/x-npy"})
            assert status == 200

        def framing(name: str | None) -> Callable[[], object]:
            if name is None:
                return lambda: client.predict("cnn224", {"x": x})
            return lambda: client.predict("cnn224", {"x": x}, framing=name)

        fns: dict[str, Callable[[], object]] = {
            "raw": lambda: raw.run(out_names, {"x": x}),
            "default": framing(None),
            "tensors": framing("tensors"),
            "npy": framing("npy"),
            "npz": framing("npz"),
            "minimal": minimal_npy,
            "floor": floor_npy,
        }
        results: dict[str, list[float]] = {k: [] for k in (*fns, "json")}
        json_fn = framing("json")
        for _ in range(3):  # alternate blocks so machine noise hits every variant
            for k, fn in fns.items():
                results[k] += timed(fn, N // 3)
            results["json"] += timed(json_fn, N_JSON // 3)
        client.close()
        conn.close()
        fconn.close()
    finally:
        if floor is not None:
            stop(floor)
        stop(proc)
    raw_p50 = median(results["raw"]) * 1000
    shape = "1x3x224x224 float32 over the Unix socket, small CNN"
    labels = (
        ("default", "default path: AgentClient(), raw tensors", True),
        ("tensors", "framing raw tensors + shape header (AgentClient)", False),
        ("npy", "framing .npy (AgentClient)", False),
        ("npz", "framing .npz (AgentClient)", False),
        ("json", "framing JSON (AgentClient)", False),
        ("minimal", ".npy, minimal keep-alive client", False),
    )
    for k, label, target in labels:
        p50 = median(results[k]) * 1000
        overhead = p50 - raw_p50
        rows.append(row(f"local API latency ({label})", p50, raw_p50, "ms p50",
                        f"overhead <= {TARGET_MS} ms" if target else "",
                        met=overhead <= TARGET_MS if target else None,
                        note=f"overhead {overhead:.2f} ms over session.run; p95 "
                        f"{pct(results[k], 95) * 1000:.2f} ms; {shape}"))
    floor_p50 = median(results["floor"]) * 1000
    rows.append(row("local API floor: stdlib http.server echo", floor_p50, raw_p50, "ms p50", "", met=None,
                    note="the minimal client's .npy request to a bare http.server that reads the body and "
                    f"answers 168 bytes: {floor_p50:.2f} ms is Python's server and the socket"))
    emit(rows)


if __name__ == "__main__":
    main()
