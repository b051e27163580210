"""Enrollment's broker step at 1,000 and 10,000 devices: the fleet's password store
(fleet.broker.passwords: one appended line per change, compacted when the file doubles)
against the baseline it replaced, the whole file rewritten atomically per enrollment
(read, replace the user's line, write a temp file, fsync, rename), both measured here.

Rows: the store step alone (median ms per enrollment, and the mean including compactions),
and enrollment to the device's first successful login through a real Mosquitto 2 (store +
SIGHUP + CONNECT with the new password, median). Target: the store step at 10,000 devices
costs at most half the rewrite, and does not grow with the fleet.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.common import QUICK, Row, emit, free_port, row
from fleet.broker.passwords import BrokerPasswordFile, hash_password

SIZES = (1000, 10000)
ENROLLMENTS = 100 if QUICK else 500
LOGINS = 10 if QUICK else 30


def rewrite_whole(path: Path, user: str, password: str) -> None:
    """The baseline: the store before (the file rewritten for every enrollment)."""
    line = f"{user}:{hash_password(password)}"
    old = path.read_text() if path.exists() else ""
    lines = [x for x in old.splitlines() if x.split(":", 1)[0] != user] + [line]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def fleet_file(n: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="bench-enroll-")) / "edgefleet.passwd"
    line = hash_password("x")
    path.write_text("".join(f"dev-{i:05d}:{line}\n" for i in range(n)))
    return path


def store_step(n: int, store: Callable[[Path], Callable[[str, str], None]]) -> tuple[float, float]:
    """(median, mean) ms of one enrollment's store step with ``n`` devices in the file."""
    path = fleet_file(n)
    set_password = store(path)
    set_password("warm-up", "x")  # the first append compacts a file made elsewhere once
    times = []
    started = time.perf_counter()
    for i in range(ENROLLMENTS):
        t = time.perf_counter()
        set_password(f"new-{i}", "s3cret")
        times.append(time.perf_counter() - t)
    mean = (time.perf_counter() - started) / ENROLLMENTS
    return statistics.median(times) * 1000, mean * 1000


def _login(port: int, user: str, password: str) -> int:
    got: list[int] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p: got.append(rc.value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 2
    while not got and time.monotonic() < deadline:
        time.sleep(0.001)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else -1


def to_first_login(n: int, store: Callable[[Path, int], Callable[[str, str], None]]) -> float:
    """Median ms from an enrollment's store step to the device's first accepted CONNECT."""
    path = fleet_file(n)
    port = free_port()
    conf = path.with_name("mosquitto.conf")
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}per_listener_settings false\nallow_anonymous false\n"
                    f"password_file {path}\nlistener {port} 127.0.0.1\nlog_dest none\n")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.05)
        set_password = store(path, proc.pid)
        set_password("warm-up", "x")
        times = []
        for i in range(LOGINS):
            t = time.perf_counter()
            set_password(f"new-{i}", "s3cret")
            while _login(port, f"new-{i}", "s3cret") != 0:
                if time.perf_counter() - t > 10:
                    raise RuntimeError("the new password was never accepted")
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    rows: list[Row] = []
    for n in SIZES:
        ours_med, ours_mean = store_step(n, lambda p: BrokerPasswordFile(p).set)
        base_med, base_mean = store_step(n, lambda p: lambda u, pw: rewrite_whole(p, u, pw))
        rows.append(row(f"enroll: broker password store, {n} devices (median)", ours_med, base_med, "ms",
                        "<= 0.5x" if n >= 10000 else "", note="baseline: file rewritten per enrollment"))
        rows.append(row(f"enroll: broker password store, {n} devices (mean incl. compaction)",
                        ours_mean, base_mean, "ms", ""))

        def ours(p: Path, pid: int) -> Callable[[str, str], None]:
            return BrokerPasswordFile(p, f"kill -HUP {pid}").set

        def base(p: Path, pid: int) -> Callable[[str, str], None]:
            def set_password(u: str, pw: str) -> None:
                rewrite_whole(p, u, pw)
                subprocess.run(["kill", "-HUP", str(pid)], check=False)
            return set_password

        rows.append(row(f"enroll: store to first Mosquitto login, {n} devices", to_first_login(n, ours),
                        to_first_login(n, base), "ms", "", note="incl. Mosquitto's re-read on SIGHUP"))
    emit(rows)


if __name__ == "__main__":
    main()
