"""Bytes on the wire per day of an idle agent, both ways, counted at the socket level.

Real agents (the lean device venv) with a [fleet] section (enrollment, then a conditional
desired-state poll every poll_interval_s, default 300 s) and an [mqtt] section (keepalive
default 300 s), in front of a real fleet process (PostgreSQL, private Mosquitto). Each
agent's fleet URL and MQTT URL point at its own loopback proxies that count the payload bytes
of the TCP streams each way (and keep them, to count MQTT packets and HTTP answers by kind).
Each agent serves one installed model (the demo classifier) and gets no requests: "idle".

Four agents run side by side: encoding msgpack (the default) and json, health every 60 s (the
default) and every 10 s. After a warm-up (enrollment, first connect, first full poll) the
bytes over WINDOW s are counted and extrapolated to a day. WINDOW is a whole number of poll
intervals (600 s in the full run), so the count holds the polls a day has in proportion.
Target <= 1 MB/day at 60 s with the default encoding (baseline column: that budget); the
JSON rows and the 10 s rows are stated.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    QUICK,
    CountingProxy,
    agent_install,
    agent_python,
    build,
    emit,
    fleet_process,
    keyring,
    mosquitto,
    pg_schema,
    postgres_url,
    row,
    start_agent,
    stop,
    write_classifier,
)

WINDOW = float(os.environ.get("BENCH_WIRE_WINDOW", 62.0 if QUICK else 600.0))
WARMUP = 10.0
DAY = 86400.0
BUDGET = 1_000_000.0
POLL_S = 300.0  # the agent's default fleet.poll_interval_s (not set in the config below)
# Per TCP segment on a real link: IPv4 20 + TCP 20 + timestamps 12 bytes (not in the count).
TCPIP_HEADER = 52
MQTT_TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 8: "SUBSCRIBE", 9: "SUBACK",
              12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT"}


def config(path: Path, device: str, fleet_port: int, mqtt_port: int, token: str, root: Path,
           interval: float, encoding: str) -> Path:
    home = path.parent
    path.write_text("\n".join([
        f'device_id = "{device}"', f'state_dir = "{home / "state"}"', f'trust_root = "{root}"',
        "[api]", 'listen = ""', f'unix_socket = "{home / "agent.sock"}"',
        "[fleet]", f'url = "http://127.0.0.1:{fleet_port}"', f'enrollment_token = "{token}"',
        "[mqtt]", f'url = "mqtt://127.0.0.1:{mqtt_port}"', f"health_interval_s = {interval}",
        f'encoding = "{encoding}"',
    ]) + "\n")
    return path


def mqtt_packets(stream: bytes) -> dict[str, int]:
    """Count MQTT control packets by type in one direction of a TCP stream."""
    counts: dict[str, int] = {}
    pos = 0
    while pos < len(stream):
        kind = MQTT_TYPES.get(stream[pos] >> 4, f"type{stream[pos] >> 4}")
        length, shift, pos = 0, 0, pos + 1
        while pos < len(stream):
            b = stream[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        pos += length
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def http_answers(stream: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for status in (b"200", b"304", b"401", b"500"):
        n = stream.count(b"HTTP/1.1 " + status + b" ")
        if n:
            out[status.decode()] = n
    return out


def main() -> None:
    agent_python()
    runs: dict[tuple[str, float], tuple[object, CountingProxy, CountingProxy]] = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp_s, mosquitto(Path(tmp_s)) as mqtt_url, \
            pg_schema(postgres_url()) as db:
        tmp = Path(tmp_s)
        with fleet_process(tmp, mqtt_url, db) as (url, _admin, enroll, keys_dir):
            fleet_port, broker_port = int(url.rsplit(":", 1)[1]), int(mqtt_url.rsplit(":", 1)[1])
            model = tmp / "clf.onnx"
            write_classifier(model)
            golden = {"x": np.random.default_rng(1).random((1, 4), dtype=np.float32)}
            bundle = tmp / "clf.bundle"
            build(model, "clf", golden, keyring(keys_dir), bundle, atol=1e-2, rtol=1e-2)
            for encoding in ("msgpack", "json"):
                for interval in (60.0, 10.0):
                    home = tmp / f"agent-{encoding}-{interval:g}"
                    home.mkdir()
                    http = CountingProxy("127.0.0.1", fleet_port, keep=True)
                    mq = CountingProxy("127.0.0.1", broker_port, keep=True)
                    cfg = config(home / "agent.toml", f"wire-{encoding}-{interval:g}", http.port, mq.port,
                                 enroll, keys_dir / "root.json", interval, encoding)
                    agent_install(cfg, bundle)
                    runs[(encoding, interval)] = (start_agent(cfg, home / "agent.log"), http, mq)
            time.sleep(WARMUP)
            for _p, h, m in runs.values():
                h.mark()
                m.mark()
            t0 = time.monotonic()
            time.sleep(WINDOW)
            measured = time.monotonic() - t0
            for _p, h, m in runs.values():
                h.mark()
                m.mark()
            for (encoding, interval), (proc, h, m) in runs.items():
                stop(proc)  # type: ignore[arg-type]
                h.close()
                m.close()
                log_file = tmp / f"agent-{encoding}-{interval:g}" / "agent.log"
                log = log_file.read_text(errors="replace").strip()
                print(f"agent {encoding} {interval:g} s log (warnings and errors): {log[-1500:] or 'empty'}",
                      file=sys.stderr)
    rows = []
    scale = DAY / measured
    for (encoding, interval), (_proc, h, m) in runs.items():
        hu, hd = h.between_marks()
        mu, md = m.between_marks()
        segs = h.segments_between_marks() + m.segments_between_marks()
        total = len(hu) + len(hd) + len(mu) + len(md)
        per_day = total * scale
        link = (total + 2 * TCPIP_HEADER * segs) * scale
        pk_up, pk_down = mqtt_packets(mu), mqtt_packets(md)
        answers = http_answers(hd)
        note = (f"measured {total} B over {measured:.0f} s (x{scale:.1f} to a day) "
                f"after a {WARMUP:g} s warm-up: "
                f"HTTP up {len(hu)} down {len(hd)} ({answers or 'no poll'}; {h.connections_between_marks()} "
                f"new TCP connections), MQTT up {len(mu)} down {len(md)} (up {pk_up}, down {pk_down}); "
                f"{segs} TCP segments: ~{link / 1e6:.2f} MB/day on a link with {TCPIP_HEADER}-byte TCP/IP "
                f"headers and an ACK per segment (estimate); one model installed, no requests; "
                f"poll {POLL_S:g} s, keepalive 300 s (defaults)")
        print(f"{encoding} {interval:g} s: {per_day / 1e6:.3f} MB/day; {note}", file=sys.stderr)
        name = f"wire bytes/day, idle agent, {encoding}, health {interval:g} s (MB/day)"
        if interval == 60.0 and encoding == "msgpack":  # the budget is the defaults'; JSON is opt-in
            rows.append(row(name, per_day / 1e6, BUDGET / 1e6, "MB/day", "<= 1x", note=note))
        else:
            rows.append(row(name, per_day / 1e6, BUDGET / 1e6, "MB/day", "", met=None, note=note))
    emit(rows)


if __name__ == "__main__":
    main()
