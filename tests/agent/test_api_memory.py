"""A real agent process under hostile local clients keeps its memory bounded (issue 16):
1,000 idle connections, a 100 MB JSON body, and the largest JSON bodies the limits allow,
sent at once by more clients than the body budget admits. docs/agent-api.md ("Limits")
states the figures this test measured; the bounds asserted here are those, with margin."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from agent.cli import main as cli_main
from shared.bundle.keyring import Keyring

from .conftest import Bundles, free_port

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, f.read(length)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if _request(port, b"GET /readyz HTTP/1.1\r\n\r\n")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the agent never became ready: " + log.read_text())


def test_a_real_agent_keeps_its_memory_bounded(tmp_path: Path, keyring: Keyring, bundles: Bundles) -> None:
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ntrust_root = "{keyring.root_path}"\n'
                   f'[api]\nlisten = "127.0.0.1:{port}"\n')
    assert cli_main(["--config", str(cfg), "install", str(bundles.build(1))]) == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:  # this process opens the 1,000 connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    log = tmp_path / "agent.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=fh,
                                stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, proc, log)
        x = np.random.default_rng(0).random((4, 4), dtype=np.float32)
        small = json.dumps({"inputs": {"x": x.tolist()}}).encode()
        predict = (b"POST /v1/models/clf/predict HTTP/1.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n")
        for _ in range(20):  # warm: the model ran, the reply paths were taken
            assert _request(port, predict % len(small), small)[0] == 200
        base = _status(proc.pid)["VmRSS"]

        # 1,000 idle connections, then one request on each of 100 of them.
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(1000)]
        try:
            for s in socks[-100:]:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            for s in socks[-100:]:
                assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            idle = _status(proc.pid)["VmRSS"]
        finally:
            for s in socks:
                s.close()

        # A 100 MB JSON body, sent for real: answered 413 from its head, the rest never read.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(predict % (100 * 1000 * 1000))
            chunk = b"[0.125, 0.25, 0.5, 1.0], " * (MB // 25)
            sent = 0
            try:
                s.sendall(b'{"inputs": {"x": [')
                while sent < 100 * 1000 * 1000:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                reply = s.recv(4096)
            except ConnectionResetError:
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 413 ")
        after_100mb = _status(proc.pid)["VmRSS"]

        # The largest JSON body allowed (max_json_bytes, 8 MiB), from 8 clients at once: the
        # budget (128 MiB weighted, 40 MiB each) admits 3, the others get 503.
        rows = np.random.default_rng(1).random((8 * MB // 20, 4)).round(3)
        text = json.dumps({"inputs": {"x": rows.tolist()}}, separators=(",", ":")).encode()
        text = text[:8 * MB]
        cut = text.rfind(b"],[")
        big = text[:cut] + b"]]}}"
        assert 7 * MB < len(big) <= 8 * MB
        statuses: list[int] = []

        def send_big() -> None:  # as a well-behaved client: the body after 100 Continue only
            head = predict.replace(b"\r\n\r\n", b"\r\nAccept: application/x-npz\r\n"
                                   b"Expect: 100-continue\r\n\r\n") % len(big)
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(head)
                f = s.makefile("rb")
                line = f.readline()
                if line.startswith(b"HTTP/1.1 100 "):
                    f.readline()
                    s.sendall(big)
                    line = f.readline()
                statuses.append(int(line.split()[1]))

        threads = [threading.Thread(target=send_big) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = _status(proc.pid)["VmHWM"]
        assert proc.poll() is None
        assert 200 in statuses and set(statuses) <= {200, 503}, statuses
        print(f"\nagent RSS: base {base / MB:.1f} MB; 1,000 idle connections +{(idle - base) / MB:.1f} MB; "
              f"after a 100 MB JSON body +{(after_100mb - base) / MB:.1f} MB; 8 clients x "
              f"{len(big) / MB:.1f} MB JSON at once: peak +{(peak - base) / MB:.1f} MB "
              f"({statuses.count(200)} served, {statuses.count(503)} answered 503)")
        assert idle - base < 16 * MB
        assert after_100mb - base < 8 * MB
        assert peak - base < 128 * MB  # within api.max_inflight_bytes (measured: +85 MB)
    finally:
        proc.terminate()
        proc.wait(30)
