"""Local API latency: p50 of a predict over the agent's Unix socket with a binary tensor
(1x3x224x224 float32, .npy in, .npy out) on one keep-alive connection, against a raw
``session.run`` of the same model on the same input. The target is on the difference
(the API's overhead), not the ratio. Also reported: the same request as .npz, and through
agent.client.AgentClient (httpx, .npz both ways) as an application would call it."""

from __future__ import annotations

import io
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

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


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(10):
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
    proc = start_agent(prep.config, work / "agent.log")
    rows = []
    try:
        wait_ready(prep.socket, proc=proc)
        conn = UnixHttp(prep.socket)
        path = "/v1/models/cnn224/predict"
        npy = npy_bytes(x)
        buf = io.BytesIO()
        np.savez(buf, x=x)
        npz = buf.getvalue()

        def api_npy() -> None:
            status, _, _ = conn.request("POST", path, npy, {"Content-Type": "application/x-npy"})
            assert status == 200

        def api_npz() -> None:
            status, _, _ = conn.request("POST", path, npz, {"Content-Type": "application/x-npz"})
            assert status == 200

        client = AgentClient(unix_socket=str(prep.socket))
        floor_sock = work / "floor.sock"
        floor = subprocess.Popen([str(agent_python()), "-m", "bench.floor_server", str(floor_sock)],
                                 env=agent_env())
        for _ in range(200):
            if floor_sock.exists():
                break
            time.sleep(0.02)
        fconn = UnixHttp(floor_sock)

        def floor_npy() -> None:
            status, _, _ = fconn.request("POST", path, npy, {"Content-Type": "application/x-npy"})
            assert status == 200

        def api_client() -> None:
            client.predict("cnn224", {"x": x})

        def session_run() -> None:
            raw.run(None, {"x": x})

        results: dict[str, list[float]] = {k: [] for k in ("npy", "npz", "client", "raw", "floor")}
        fns = {"npy": api_npy, "npz": api_npz, "client": api_client, "raw": session_run, "floor": floor_npy}
        for _ in range(3):  # alternate blocks so machine noise hits every variant
            for k, fn in fns.items():
                results[k] += timed(fn, N // 3)
        client.close()
        conn.close()
        fconn.close()
        stop(floor)
    finally:
        stop(proc)
    raw_p50 = median(results["raw"]) * 1000
    for k, label in (("npy", ".npy, minimal keep-alive client"), ("npz", ".npz, minimal keep-alive client"),
                     ("client", "AgentClient (httpx, .npz)")):
        p50 = median(results[k]) * 1000
        overhead = p50 - raw_p50
        rows.append(row(f"local API latency ({label})", p50, raw_p50, "ms p50", "overhead <= 0.5 ms",
                        met=overhead <= 0.5,
                        note=f"overhead {overhead:.2f} ms; p95 {pct(results[k], 95) * 1000:.2f} ms; "
                        "1x3x224x224 float32 over the Unix socket, small CNN"))
    floor_p50 = median(results["floor"]) * 1000
    rows.append(row("local API floor: stdlib http.server echo", floor_p50, raw_p50, "ms p50", "", met=None,
                    note="same request and client, a bare http.server that reads the body and answers "
                    f"168 bytes: {floor_p50:.2f} ms is Python's server and the socket, not the agent"))
    emit(rows)


if __name__ == "__main__":
    main()
