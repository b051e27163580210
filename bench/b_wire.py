"""Bytes on the wire per day of an idle agent (no model installed), both ways.

A real agent (the lean device venv) with a [fleet] section (enrolls, polls the desired state
every poll_interval_s, default 30 s) and an [mqtt] section (keepalive default 60 s), in front
of a real fleet process (PostgreSQL, private Mosquitto). Its fleet URL and MQTT URL point at
loopback proxies that count the bytes each way. Two agents run side by side, health every
60 s and every 10 s; after a warm-up (enrollment, first connect) the bytes over WINDOW s are
extrapolated to a day. Target <= 1 MB/day at 60 s (baseline column: that budget).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    QUICK,
    CountingProxy,
    agent_python,
    emit,
    fleet_process,
    mosquitto,
    pg_schema,
    postgres_url,
    row,
    start_agent,
    stop,
)

# Measure over several poll intervals for a faithful figure (the default poll is 300 s).
WINDOW = float(os.environ.get("BENCH_WIRE_WINDOW", 62.0 if QUICK else 122.0))
WARMUP = 8.0
DAY = 86400.0
BUDGET = 1_000_000.0


def config(path: Path, device: str, fleet_port: int, mqtt_port: int, token: str, root: Path,
           interval: float) -> Path:
    home = path.parent
    path.write_text("\n".join([
        f'device_id = "{device}"', f'state_dir = "{home / "state"}"', f'trust_root = "{root}"',
        "[api]", 'listen = ""', f'unix_socket = "{home / "agent.sock"}"',
        "[fleet]", f'url = "http://127.0.0.1:{fleet_port}"', f'enrollment_token = "{token}"',
        "[mqtt]", f'url = "mqtt://127.0.0.1:{mqtt_port}"', f"health_interval_s = {interval}",
    ]) + "\n")
    return path


def main() -> None:
    agent_python()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp_s, mosquitto(Path(tmp_s)) as mqtt_url, \
            pg_schema(postgres_url()) as db:
        tmp = Path(tmp_s)
        with fleet_process(tmp, mqtt_url, db) as (url, _admin, enroll, keys_dir):
            fleet_port, broker_port = int(url.rsplit(":", 1)[1]), int(mqtt_url.rsplit(":", 1)[1])
            runs = {}
            for interval in (60.0, 10.0):
                home = tmp / f"agent-{interval:g}"
                home.mkdir()
                http, mq = CountingProxy("127.0.0.1", fleet_port), CountingProxy("127.0.0.1", broker_port)
                cfg = config(home / "agent.toml", f"wire-{interval:g}", http.port, mq.port, enroll,
                             keys_dir / "root.json", interval)
                runs[interval] = (start_agent(cfg, home / "agent.log"), http, mq)
            time.sleep(WARMUP)
            before = {k: (h.snapshot(), m.snapshot()) for k, (_p, h, m) in runs.items()}
            time.sleep(WINDOW)
            after = {k: (h.snapshot(), m.snapshot()) for k, (_p, h, m) in runs.items()}
            for k, (proc, h, m) in runs.items():
                stop(proc)
                h.close()
                m.close()
                log = (tmp / f"agent-{k:g}" / "agent.log").read_text(errors="replace").strip()
                print(f"agent {k:g} s log (warnings and errors): {log[-1500:] or 'empty'}", file=sys.stderr)
    figures = {}
    for k in runs:
        (h0, m0), (h1, m1) = before[k], after[k]
        scale = DAY / WINDOW
        hu, hd = (h1[0] - h0[0]) * scale, (h1[1] - h0[1]) * scale
        mu, md = (m1[0] - m0[0]) * scale, (m1[1] - m0[1]) * scale
        figures[k] = (hu + hd + mu + md, hu, hd, mu, md)
        print(f"interval {k:g}: http up {hu/1e6:.3f} down {hd/1e6:.3f} MB/day; mqtt up {mu/1e6:.3f} "
              f"down {md/1e6:.3f} MB/day; connections http {runs[k][1].connections} "
              f"mqtt {runs[k][2].connections}",
              file=sys.stderr)

    def note(k: float) -> str:
        _t, hu, hd, mu, md = figures[k]
        return (f"MB/day: HTTP polls up {hu/1e6:.2f} down {hd/1e6:.2f}, "
                f"MQTT up {mu/1e6:.2f} down {md/1e6:.2f}; "
                f"measured over {WINDOW:g} s after a {WARMUP:g} s warm-up, x{DAY / WINDOW:.0f}; "
                "idle agent, no model; poll_interval_s 30, keepalive 60 (defaults)")

    emit([row("wire bytes/day, idle agent, health 60 s (MB/day)", figures[60.0][0] / 1e6, BUDGET / 1e6,
              "MB/day", "<= 1x", note=note(60.0)),
          row("wire bytes/day, idle agent, health 10 s (agent default) (MB/day)", figures[10.0][0] / 1e6,
              BUDGET / 1e6, "MB/day", "", met=None, note=note(10.0))])


if __name__ == "__main__":
    main()
