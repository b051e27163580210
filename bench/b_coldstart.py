"""Agent cold start: from exec of ``edgefleet-agent run`` (lean venv, offline config, model
installed) to ``/readyz`` answering 200 — the release verified and loaded, warmed up, the
batching probe done, the API open — against a bare Python that imports onnxruntime, loads
the session and runs it once. Median of several starts, alternated."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.b_memory import BARE
from bench.common import (
    QUICK,
    agent_env,
    agent_python,
    emit,
    median,
    prepare_agent,
    row,
    start_agent,
    stop,
    wait_ready,
)

REPS = 2 if QUICK else 5


def bare_start(model: Path, sample: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen([str(agent_python()), "-c", BARE, str(model), str(sample)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env())
    assert proc.stdout is not None
    proc.stdout.readline()
    dt = time.monotonic() - t0
    proc.kill()
    proc.wait()
    return dt


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    rows = []
    for kind, label in (("rec", "PP-OCRv4 rec"), ("clf", "demo classifier")):
        prep = prepare_agent(kind, work / kind)
        sample = work / kind / "sample.npy"
        np.save(sample, prep.sample["x"])
        ours, bare = [], []
        for _ in range(REPS):
            t0 = time.monotonic()
            proc = start_agent(prep.config, work / kind / "agent.log")
            try:
                ours.append(wait_ready(prep.socket, proc=proc, interval=0.002) - t0)
            finally:
                stop(proc)
            bare.append(bare_start(prep.model, sample))
        # the target (19); on a tiny model the modules a serving agent needs beyond
        # numpy and onnxruntime are ~a third of the bare start (docs/performance.md)
        rows.append(row(f"agent cold start ({label})", median(ours), median(bare), "s", "<= 1.3x",
                        note=f"exec to /readyz 200 vs bare python import + load + one run; median of {REPS}"))
    emit(rows)


if __name__ == "__main__":
    main()
