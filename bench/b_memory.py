"""Agent memory: RSS of the agent serving a model, idle, against a bare Python process
holding an onnxruntime session of the same model file — both in the lean device venv
(bench/.venv-agent: ``pip install '.[agent]'`` only), both after one run on the same input.

The product's bar is also checked: agent < Mender client idle + the bare inference process.
The Mender client (Debian package mender-client) is measured idle when it is installed,
else the issue's 37 MB is used and the note says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    QUICK,
    UnixHttp,
    agent_env,
    agent_python,
    emit,
    npy_bytes,
    prepare_agent,
    row,
    rss_mb,
    start_agent,
    stop,
    wait_ready,
)

SETTLE_S = 2.0 if QUICK else 4.0
MENDER_QUOTED_MB = 37.0

BARE = """
import sys, time
import numpy as np, onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], sess_options=opts, providers=["CPUExecutionProvider"])
s.run(None, {"x": np.load(sys.argv[2])})
print("ready", flush=True)
sys.stdin.read()
"""


def bare_rss(model: Path, sample: np.ndarray, workdir: Path) -> float:
    np.save(workdir / "sample.npy", sample)
    proc = subprocess.Popen([str(agent_python()), "-c", BARE, str(model), str(workdir / "sample.npy")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=agent_env())
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(SETTLE_S)
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def agent_rss(kind: str, workdir: Path) -> tuple[float, float, dict[str, np.ndarray], Path]:
    prep = prepare_agent(kind, workdir)
    proc = start_agent(prep.config, workdir / "agent.log")
    try:
        wait_ready(prep.socket, proc=proc)
        ready_rss = rss_mb(proc.pid)
        c = UnixHttp(prep.socket)
        status, _, _ = c.request("POST", f"/v1/models/{kind}/predict", npy_bytes(prep.sample["x"]),
                                 {"Content-Type": "application/x-npy"})
        c.close()
        assert status == 200, status
        time.sleep(SETTLE_S)
        return rss_mb(proc.pid), ready_rss, prep.sample, prep.model
    finally:
        stop(proc)


VERIFY = """
import gc, sys
from pathlib import Path
import numpy, onnxruntime  # noqa: F401  (in the agent already)
import agent.main  # noqa: F401  (the resident agent's modules)
from shared.bundle import sigcheck
from shared.bundle.archive import read_envelope
from shared.bundle.trust import TrustRoot

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

root_bytes = Path(sys.argv[1]).read_bytes()
envelope = read_envelope(Path(sys.argv[2]))
TrustRoot.load_verified(root_bytes)
gc.collect()
before = rss()
sigcheck.use_child_process(sys.argv[3] == "child")
for _ in range(3):  # a root check and a manifest check per update; three updates
    TrustRoot.load(root_bytes).verify_manifest(envelope)
gc.collect()
print(rss() - before, "cryptography" in sys.modules)
"""


def verify_rss(prep_dir: Path, kind: str, mode: str) -> tuple[float, bool]:
    """RSS a process holding the agent's modules gains from checking a root and a bundle's
    signatures three times, with the checks in a child (the agent's way) or in-process."""
    out = subprocess.run([str(agent_python()), "-c", VERIFY, str(prep_dir.parent / "keys" / "root.json"),
                          str(prep_dir / f"{kind}.bundle"), mode],
                         capture_output=True, text=True, env=agent_env(), timeout=300, check=True)
    growth, loaded = out.stdout.split()
    return float(growth), loaded == "True"


def mender_rss(workdir: Path) -> float | None:
    """Idle RSS of the real Mender client daemon (mender-client 3.x), offline server."""
    binary = shutil.which("mender")
    if binary is None:
        return None
    data = workdir / "mender-data"
    data.mkdir()
    (data / "device_type").write_text("device_type=edgefleet-bench\n")
    conf = workdir / "mender.conf"
    conf.write_text(json.dumps({"ServerURL": "http://127.0.0.1:9", "UpdatePollIntervalSeconds": 1800,
                                "InventoryPollIntervalSeconds": 28800, "RetryPollIntervalSeconds": 300}))
    proc = subprocess.Popen([binary, "--config", str(conf), "--data", str(data), "--no-syslog", "daemon"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8.0)  # bootstrap (key generation), one failed check, then idle
        if proc.poll() is not None:
            return None
        return rss_mb(proc.pid)
    finally:
        stop(proc)  # type: ignore[arg-type]


def main() -> None:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    mender = mender_rss(work)
    mender_note = ("Mender client 3.4 (Debian mender-client) measured idle in this run"
                   if mender is not None else f"Mender client {MENDER_QUOTED_MB} MB as quoted in the issue, "
                   "not measured (mender-client not installed)")
    mender_mb = mender if mender is not None else MENDER_QUOTED_MB
    kinds = ["rec", "clf"] if QUICK else ["rec", "det", "clf"]
    labels = {"rec": "PP-OCRv4 rec", "det": "PP-OCRv4 det", "clf": "demo classifier"}
    for kind in kinds:
        ours, ready, sample, model = agent_rss(kind, work / kind)
        bare = bare_rss(model, sample["x"], work / kind)
        rows.append(row(f"agent memory ({labels[kind]})", ours, bare, "MB RSS", "<= 1.3x",
                        note=f"agent idle after warm-up and one request (at /readyz: {ready:.0f} MB); "
                        "baseline: bare python + onnxruntime session, one run; lean venv .[agent]"))
        rows.append(row(f"agent memory vs Mender + bare ({labels[kind]})", ours, mender_mb + bare, "MB RSS",
                        "<= 1.0x",
                        note=f"bar: agent < Mender idle ({mender_mb:.1f} MB) + bare; {mender_note}"))
    child, child_loaded = verify_rss(work / "clf", "clf", "child")
    here, here_loaded = verify_rss(work / "clf", "clf", "inprocess")
    rows.append(row("agent RSS growth from verifying 3 updates: checks in a child vs in-process (MB)",
                    child, here, "MB RSS", "",
                    note=f"cryptography loaded into the agent: child {child_loaded}, in-process "
                    f"{here_loaded}; the resident agent checks in a child (shared/bundle/sigcheck.py)"))
    emit(rows)


if __name__ == "__main__":
    main()
