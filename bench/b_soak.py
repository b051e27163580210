"""Soak: the real agent for a long run under load, broker outages and update cycles, sampled.

    python -m bench.b_soak --duration 600 [--out bench/soak-samples.json]
    make soak SOAK_MINUTES=10

One agent process (the lean device venv) against a real fleet process (SQLite) and a
private Mosquitto on a fixed free port:

- a loaded model (the demo classifier) under sustained local API load (two local apps,
  ``fleet.demo.traffic.TrafficGenerator``, field traffic over HTTP);
- health every second; Mosquitto stopped for BROKER_DOWN_S and started again every
  BROKER_EVERY_S (its retained messages go with it: the agent's desired-state poll, every
  5 s here, is then what finds new work);
- update cycles, one after the other, through the fleet's API: a faulty release (local
  rollback: the device's trial sees its errors), a healthy release with the other set of
  weights (install, activate, commit), that release rolled back by the operator (a fleet
  rollback: the previous release re-issued as a new one), and again a healthy release;
- every SAMPLE_S: the agent's RSS, open file descriptors, threads and the size of its state
  directory; at the end, the telemetry sequence numbers the fleet stored against those the
  device used.

Targets after the warm-up (the first WARMUP_FRACTION of the run, at least one update cycle):
RSS growth <= 5 MB (median of the last three samples minus the median of the first three),
file descriptors and threads flat (the same range after warm-up), the state directory
bounded, and no health or event seq missing at the fleet beyond what the device reports as
dropped. Prints a table and writes every sample to --out (JSON) and a CSV beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    BENCH,
    QUICK,
    agent_env,
    agent_python,
    emit,
    free_port,
    keyring,
    row,
    start_agent,
    stop,
)
from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from fleet.demo.scenario import DemoConfig, DemoFleet
from fleet.demo.traffic import TrafficGenerator

MODEL = "soak-classifier"
HEALTH_S = 1.0
POLL_S = 5.0
BROKER_DOWN_S = 5.0
WARMUP_FRACTION = 0.25
RSS_BOUND_MB = 5.0
TRAFFIC_RPS = 40.0  # per local app; two apps
SPOOL_MAX_BYTES = 65536


class Broker:
    """Mosquitto on a fixed port that can be stopped and started again."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        # Persistence as in packaging/mosquitto/edgefleet.conf: sessions and their queued
        # messages survive a restart (saved on the clean stop). Mosquitto started as root
        # drops to its own user, which cannot write our work dir: it stays the current user.
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {workdir}/\nuser {getpass.getuser()}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = next(b for b in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(b).exists())
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


class Sampler(threading.Thread):
    def __init__(self, pid: int, state_dir: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.state_dir = state_dir
        self.every = every
        self.samples: list[dict[str, float]] = []
        self.t0 = time.monotonic()
        self.marks: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.samples.append({
                    "t": round(time.monotonic() - self.t0, 1),
                    "rss_mb": round(self.proc.memory_info().rss / (1 << 20), 2),
                    "fds": self.proc.num_fds(),
                    "threads": self.proc.num_threads(),
                    "state_kb": round(dir_bytes(self.state_dir) / 1024, 1),
                })
            if self._halt.wait(self.every):
                return

    def mark(self, what: str) -> None:
        self.marks.append((round(time.monotonic() - self.t0, 1), what))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Observer:
    """A subscriber with a persistent session (fixed id, clean session off, QoS 1): the broker
    queues for it while it is away, so it sees every message the broker accepted from the
    device, status included; the device's side of "nothing lost" is judged on its seqs."""

    def __init__(self, url: str, device: str) -> None:
        import paho.mqtt.client as mqtt

        from shared.telemetry import messages, topics

        self.seqs: dict[str, set[int]] = {"health": set(), "event": set(), "status": set()}
        self.dropped = 0
        port = int(url.rsplit(":", 1)[1])

        def on_message(client: object, userdata: object, msg: Any) -> None:
            _dev, kind = topics.parse_topic(msg.topic)
            with contextlib.suppress(Exception):
                m = messages.decode(kind, msg.payload)
                if kind in self.seqs and getattr(m, "seq", 0):
                    self.seqs[kind].add(int(m.seq))  # type: ignore[union-attr]
                if kind == "health":
                    self.dropped = max(self.dropped, int(m.dropped))  # type: ignore[union-attr]

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-observer",
                                  clean_session=False)
        self.client.on_message = on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.PREFIX}/{device}/+", qos=1)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Soak:
    def __init__(self, work: Path, duration: float, broker_every: float, sample_every: float,
                 tracemalloc: bool = False) -> None:
        self.work = work
        self.tracemalloc = tracemalloc
        self.snapshots = 0
        self.duration = duration
        self.broker_every = broker_every
        self.sample_every = sample_every
        self.keys = keyring(work / "keys")
        self.broker = Broker(work)
        self.demo = DemoFleet(DemoConfig(workdir=work, agents=0, narrate=lambda s: print(s, file=sys.stderr)))
        self.cycles: list[dict[str, Any]] = []
        self.stop_event = threading.Event()
        self.agent: subprocess.Popen[bytes] | None = None
        self.release = 0
        self.apps: list[TrafficGenerator] = []
        self.observer: Observer | None = None

    # -- bundles and rollouts --------------------------------------------------------
    def next_release(self) -> int:
        bundles = self.demo.check(self.demo.http.get("/api/v1/bundles", params={"name": MODEL}))
        self.release = max([self.release, *(int(b["release"]) for b in bundles)]) + 1
        return self.release

    def upload(self, *, seed: int, faulty: bool) -> int:
        release = self.next_release()
        model = self.work / f"m{release}.onnx"
        write_classifier(model, faulty=faulty, seed=seed)
        out = self.work / f"r{release}.bundle"
        build_bundle(model, name=MODEL, version=f"1.{release}.0", release=release, keyring=self.keys, out=out,
                     golden_inputs=golden_inputs())
        info = self.demo.upload(out)
        out.unlink()
        model.unlink()
        return int(info["id"])

    def rollout(self, bundle_id: int, what: str, timeout: float = 180.0, *,
                max_error_rate: float = 0.05) -> dict[str, Any]:
        spec = {"name": what, "bundle_id": bundle_id, "selector": {"soak": "yes"},
                "stages": [{"name": "all", "percent": 100, "bake_seconds": 0}],
                "gates": {"max_error_rate": max_error_rate, "min_inferences": 20, "max_install_failures": 0},
                "on_gate_failure": "rollback"}
        t0 = time.monotonic()
        rid = int(self.demo.check(self.demo.http.post("/api/v1/rollouts", json=spec))["id"])
        self.demo.check(self.demo.http.post(f"/api/v1/rollouts/{rid}/start"))
        try:
            status = self.demo.watch(rid, timeout)
        except TimeoutError as exc:
            # Recorded as a failed step; aborted so that the next cycle's rollout may take the
            # device (the fleet refuses two active rollouts on one device, 409).
            self.demo.check(self.demo.http.post(f"/api/v1/rollouts/{rid}/abort"))
            return {"what": what, "state": "timeout", "s": round(time.monotonic() - t0, 1), "error": str(exc),
                    "id": rid}
        return {"what": what, "state": status["state"], "s": round(time.monotonic() - t0, 1),
                "id": status["id"]}

    def fleet_rollback(self, rollout_id: int) -> dict[str, Any]:
        t0 = time.monotonic()
        self.demo.check(self.demo.http.post(f"/api/v1/rollouts/{rollout_id}/rollback"))
        # The device has it when it serves the re-issued release (the newest of the model).
        target = self.next_release() - 1
        self.release -= 1
        ok = self.wait_serving(target, 120)
        return {"what": "fleet rollback", "state": "rolled_back" if ok else "timeout",
                "s": round(time.monotonic() - t0, 1)}

    def wait_serving(self, release: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop_event.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                models = httpx.get(f"{self.demo.agent_api['soak-01']}/v1/models", timeout=5).json()["models"]
                if any(m["name"] == MODEL and int(m["release"]) == release for m in models):
                    return True
            time.sleep(0.5)
        return False

    def cycle(self, n: int, sampler: Sampler) -> None:
        seed = n % 2 + 1
        # The fleet's error-rate gate is off for the faulty release: the device's own trial
        # must catch it (a local rollback), then the fleet's local_rollbacks gate rolls back.
        steps = [self.rollout(self.upload(seed=0, faulty=True), f"cycle {n}: faulty (local rollback)",
                              max_error_rate=1.0)]
        healthy = self.rollout(self.upload(seed=seed, faulty=False), f"cycle {n}: healthy seed {seed}")
        steps.append(healthy)
        if healthy["state"] == "succeeded":
            steps.append(self.fleet_rollback(int(healthy["id"])))
        other = 3 - seed
        steps.append(self.rollout(self.upload(seed=other, faulty=False), f"cycle {n}: healthy seed {other}"))
        self.cycles.append({"cycle": n, "steps": steps})
        sampler.mark(f"cycle {n} done")
        print(f"cycle {n}: " + "; ".join(f"{s['what'].split(': ')[-1]} -> {s['state']} ({s['s']} s)"
                                         for s in steps), file=sys.stderr)

    def flap_broker(self, sampler: Sampler) -> None:
        while not self.stop_event.wait(self.broker_every - BROKER_DOWN_S):
            self.broker.stop()
            sampler.mark("broker down")
            time.sleep(BROKER_DOWN_S)
            self.broker.start()
            self.broker.restarts += 1
            sampler.mark("broker up")

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.broker.start()
        self.demo.cfg.mqtt_url = self.broker.url
        self.observer = Observer(self.broker.url, "soak-01")
        self.demo.start_fleet()
        api_port = free_port()
        home = self.work / "device"
        home.mkdir()
        cfg = home / "agent.toml"
        cfg.write_text("\n".join([
            'device_id = "soak-01"', f'state_dir = "{home / "state"}"',
            f'trust_root = "{self.work / "keys" / "root.json"}"',
            "[fleet]", f'url = "{self.demo.fleet_url}"', f'enrollment_token = "{self.demo.enroll_token}"',
            'labels = { soak = "yes" }', f"poll_interval_s = {POLL_S}",
            "[mqtt]", f'url = "{self.broker.url}"', f"health_interval_s = {HEALTH_S}",
            # The smallest spool bound (8 KiB segments): the state directory's bound is visible
            # within minutes (a 5 s outage spools ~5 KB, nothing is dropped).
            f"spool_max_bytes = {SPOOL_MAX_BYTES}",
            "[api]", f'listen = "127.0.0.1:{api_port}"',
            "[update]", "trial_seconds = 3.0", "trial_max_error_rate = 0.2", "trial_min_inferences = 10",
        ]) + "\n")
        if self.tracemalloc:
            with open(home / "agent.log", "ab") as log:
                self.agent = subprocess.Popen(
                    [str(agent_python()), str(BENCH / "tracemalloc_agent.py"), str(self.work / "trace"),
                     "-c", str(cfg), "--log-level", "WARNING", "run"],
                    env=agent_env(), stdout=log, stderr=subprocess.STDOUT)
        else:
            self.agent = start_agent(cfg, home / "agent.log")
        self.demo.agent_api["soak-01"] = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while self.demo.http.get("/api/v1/devices/soak-01").status_code != 200:
            if time.monotonic() > deadline or self.agent.poll() is not None:
                raise RuntimeError(f"the agent did not enroll: {(home / 'agent.log').read_text()[-1500:]}")
            time.sleep(0.2)
        # The local apps run from the start (answered 404 until the first release is active):
        # the rollout gates need inferences to judge.
        apps = [TrafficGenerator(self.demo.agent_api["soak-01"], MODEL, rate=TRAFFIC_RPS, seed=i)
                for i in range(2)]
        for app in apps:
            app.start()
        self.apps = apps
        first = self.rollout(self.upload(seed=1, faulty=False), "first release")
        if first["state"] != "succeeded":
            raise RuntimeError(f"the first rollout ended {first}: {(home / 'agent.log').read_text()[-1500:]}")
        sampler = Sampler(self.agent.pid, home / "state", self.sample_every)
        sampler.start()
        flapper = threading.Thread(target=self.flap_broker, args=(sampler,), daemon=True)
        flapper.start()
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < self.duration and self.agent.poll() is None:
            n += 1
            if self.tracemalloc and n == 3:
                self.snapshot()  # after warm-up: two cycles done
            self.cycle(n, sampler)
        top = self.snapshot() if self.tracemalloc else []
        self.stop_event.set()
        flapper.join(BROKER_DOWN_S + 15)
        if self.broker.proc is None:
            self.broker.start()
        for app in apps:
            app.stop()
        sampler.stop()
        time.sleep(3 * HEALTH_S + 5)  # the spool drains, the ingester writes
        crashed = self.agent.poll()
        stop(self.agent)
        time.sleep(2)
        seqs = self.fleet_seqs()
        state = home / "state"
        breakdown = {str(p.relative_to(state)): dir_bytes(p) if p.is_dir() else p.stat().st_size
                     for p in sorted(state.glob("*/*")) + sorted(state.glob("*"))}
        traffic = {"ok": sum(a.stats.ok for a in apps), "errors": sum(a.stats.errors for a in apps),
                   "not_ready": sum(a.stats.not_ready for a in apps)}
        return {"duration_s": round(time.monotonic() - t0, 1), "cycles": self.cycles,
                "samples": sampler.samples,
                "marks": sampler.marks, "broker_restarts": self.broker.restarts, "telemetry": seqs,
                "traffic": traffic, "agent_exit_during_run": crashed, "state_breakdown": breakdown,
                "tracemalloc_growth": top,
                "agent_log_tail": (home / "agent.log").read_text(errors="replace")[-3000:]}

    def snapshot(self) -> list[str]:
        """Ask the agent for a tracemalloc snapshot; from the second on, the top growths since the first."""
        import tracemalloc

        assert self.agent is not None
        self.snapshots += 1
        done = self.work / "trace" / f"snapshot-{self.snapshots}.done"
        self.agent.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.snapshots < 2:
            return []
        first = tracemalloc.Snapshot.load(str(self.work / "trace" / "snapshot-1.pickle"))
        last = tracemalloc.Snapshot.load(str(self.work / "trace" / f"snapshot-{self.snapshots}.pickle"))
        out = []
        for stat in last.compare_to(first, "traceback")[:12]:
            recent = list(stat.traceback)[-6:][::-1]  # the allocating frame first
            frames = " <- ".join(f"{f.filename.split('/work/main/')[-1]}:{f.lineno}" for f in recent)
            out.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d} blocks): {frames}")
        print("tracemalloc, growth from the first to the last snapshot:\n  " + "\n  ".join(out),
              file=sys.stderr)
        return out

    def fleet_seqs(self) -> dict[str, Any]:
        """Health and event seqs the fleet stored; gaps against what the device says it dropped."""
        db = next((self.work / "fleet").glob("*.db"))
        with contextlib.closing(sqlite3.connect(db)) as conn:
            health = [r[0] for r in conn.execute("SELECT seq FROM healthreport WHERE device_id = 'soak-01'")]
            events = [r[0] for r in conn.execute("SELECT seq FROM deviceevent WHERE device_id = 'soak-01'")]
            last = conn.execute("SELECT last_health FROM device WHERE id = 'soak-01'").fetchone()[0]
        fleet = set(health) | set(events)
        last_health = json.loads(last) if last else {}
        assert self.observer is not None
        seen = self.observer.seqs
        # What reached the broker: what the observer or the fleet got (each can miss some
        # during its own reconnect after a broker restart).
        at_broker = seen["health"] | seen["event"] | fleet
        everything = at_broker | seen["status"]
        first, last_seq = min(everything), max(everything)
        # The device's side: every seq from the first to the last reached the broker, but the
        # will's (reserved per start, sent only if the will fires) and what it reports dropped.
        device_gaps = sorted(set(range(first, last_seq + 1)) - everything)
        # The fleet's side: health and events the broker had that the fleet did not store.
        # Health without a model (before the first release) makes no row: not counted.
        fleet_missing = sorted(s for s in at_broker - fleet if s >= min(health or [first]))
        # A missed event comes back with the next health the fleet gets (its model's
        # last_event) unless a later event replaced it there first (one model in the soak):
        # "superseded", lost by design; any other missed event is a failed recovery.
        events_at_broker = seen["event"] | set(events)
        health_sorted = sorted(set(health))
        missing_events = [s for s in fleet_missing if s in events_at_broker]
        unrecovered = []
        for s in missing_events:
            next_health = next((h for h in health_sorted if h > s), None)
            if next_health is not None and not any(s < e < next_health for e in events_at_broker):
                unrecovered.append(s)
        return {"fleet_health": len(set(health)), "fleet_events": len(set(events)),
                "broker_health": len(seen["health"]), "broker_events": len(seen["event"]),
                "births": len(seen["status"]), "first": first, "last": last_seq,
                "device_gaps": len(device_gaps), "device_gaps_sample": device_gaps[:20],
                "fleet_missing": len(fleet_missing), "fleet_missing_sample": fleet_missing[:20],
                "fleet_missing_events": missing_events[:20], "fleet_unrecovered_events": unrecovered[:20],
                "device_dropped": max(self.observer.dropped, last_health.get("dropped") or 0),
                "fleet_duplicates": len(health) - len(set(health))}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    samples = result["samples"]
    start = result["duration_s"] * WARMUP_FRACTION
    first_cycle = next((t for t, what in result["marks"] if what.startswith("cycle")), start)
    warm = max(start, first_cycle)
    after = [s for s in samples if s["t"] >= warm] or samples

    def med(xs: list[dict[str, float]], key: str) -> float:
        return float(statistics.median(x[key] for x in xs))

    rss_growth = med(after[-3:], "rss_mb") - med(after[:3], "rss_mb")
    return {
        "warmup_s": warm, "samples": len(samples),
        "rss_start_mb": med(after[:3], "rss_mb"), "rss_end_mb": med(after[-3:], "rss_mb"),
        "rss_growth_mb": round(rss_growth, 2), "rss_max_mb": max(s["rss_mb"] for s in after),
        "fds": (min(s["fds"] for s in after), max(s["fds"] for s in after)),
        "fds_start_end": (med(after[:3], "fds"), med(after[-3:], "fds")),
        "threads": (min(s["threads"] for s in after), max(s["threads"] for s in after)),
        "threads_start_end": (med(after[:3], "threads"), med(after[-3:], "threads")),
        "state_kb": (min(s["state_kb"] for s in after), max(s["state_kb"] for s in after)),
        "state_kb_start_end": (med(after[:3], "state_kb"), med(after[-3:], "state_kb")),
    }


def report(result: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [f"{'t (s)':>8s} {'RSS MB':>8s} {'fds':>5s} {'threads':>8s} {'state KB':>9s}"]
    samples = result["samples"]
    step = max(1, len(samples) // 30)
    for s in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        lines.append(f"{s['t']:8.1f} {s['rss_mb']:8.1f} {s['fds']:5d} {s['threads']:8d} {s['state_kb']:9.1f}")
    steps = [st for c in result["cycles"] for st in c["steps"]]
    tel = result["telemetry"]
    lines += [
        "",
        f"run {result['duration_s']:.0f} s, warm-up {summary['warmup_s']:.0f} s, "
        f"{len(result['cycles'])} update "
        f"cycles ({len(steps)} rollouts: " + ", ".join(
            f"{k} {sum(1 for s in steps if s['state'] == k)}"
            for k in sorted({s['state'] for s in steps})) + "), "
        f"{result['broker_restarts']} broker restarts, {result['traffic']['ok']} requests answered "
        f"({result['traffic']['errors']} errors, {result['traffic']['not_ready']} not ready)",
        f"RSS after warm-up {summary['rss_start_mb']:.1f} -> {summary['rss_end_mb']:.1f} MB "
        f"(growth {summary['rss_growth_mb']:+.2f} MB, bound {RSS_BOUND_MB:g}); "
        f"max {summary['rss_max_mb']:.1f}",
        f"fds {summary['fds'][0]}-{summary['fds'][1]} (start/end {summary['fds_start_end']}), threads "
        f"{summary['threads'][0]}-{summary['threads'][1]} (start/end {summary['threads_start_end']}), "
        f"state dir {summary['state_kb'][0]:.0f}-{summary['state_kb'][1]:.0f} KB",
        f"telemetry: seq {tel['first']}..{tel['last']}; at the broker {tel['broker_health']} health, "
        f"{tel['broker_events']} events, {tel['births']} births; {tel['device_gaps']} seqs never reached "
        f"it {tel['device_gaps_sample']} (the will's, one per start, is expected), device reports "
        f"{tel['device_dropped']} dropped; the fleet stored {tel['fleet_health']} health + "
        f"{tel['fleet_events']} events, {tel['fleet_missing']} the broker had are missing there "
        f"{tel['fleet_missing_sample']} (events among them {tel['fleet_missing_events']}, not "
        "recovered from a later health's last_event although no later event replaced them: "
        f"{tel['fleet_unrecovered_events']})",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = float(os.environ.get("SOAK_MINUTES", "0")) * 60 or (45.0 if QUICK else 90.0)
    ap.add_argument("--duration", type=float, default=default,
                    help="seconds of update cycles (default %(default)s; SOAK_MINUTES)")
    ap.add_argument("--out", type=Path, default=None,
                    help="samples JSON (default bench/soak-<duration>s.json, and a .csv beside it)")
    ap.add_argument("--broker-every", type=float, default=None, help="seconds between broker restarts")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="run the agent under tracemalloc and print what grew (bench/tracemalloc_agent.py)")
    args = ap.parse_args()
    broker_every = args.broker_every or (60.0 if args.duration >= 300 else 30.0)
    sample_every = 5.0 if args.duration >= 300 else 2.0
    agent_python()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the processes on a kill
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        soak = Soak(Path(tmp), args.duration, broker_every, sample_every, args.tracemalloc)
        try:
            result = soak.run()
        finally:
            soak.stop_event.set()
            for app in soak.apps:
                app.stop()
            if soak.agent is not None:
                stop(soak.agent)
            soak.demo.stop()
            if soak.observer is not None:
                soak.observer.close()
            soak.broker.stop()
    summary = summarize(result)
    text = report(result, summary)
    print(text, file=sys.stderr)
    out = args.out or BENCH / f"soak-{args.duration:g}s.json"
    out.write_text(json.dumps({"summary": summary, **result}, indent=1) + "\n")
    with open(out.with_suffix(".csv"), "w") as fh:
        fh.write("t_s,rss_mb,fds,threads,state_kb\n")
        for s in result["samples"]:
            fh.write(f"{s['t']},{s['rss_mb']},{s['fds']},{s['threads']},{s['state_kb']}\n")
    print(f"samples written to {out} and {out.with_suffix('.csv')}", file=sys.stderr)
    tel = result["telemetry"]
    lost = max(0, tel["device_gaps"] - 1 - (tel["device_dropped"] or 0))  # the will's seq is expected
    flat = (summary["fds_start_end"][1] <= summary["fds_start_end"][0] + 2
            and summary["threads_start_end"][1] <= summary["threads_start_end"][0] + 2)
    note = (f"{result['duration_s']:.0f} s, {len(result['cycles'])} update cycles, "
            f"{result['broker_restarts']} broker restarts; fds {summary['fds_start_end']}, "
            f"threads {summary['threads_start_end']}, state dir "
            f"{summary['state_kb']} KB; telemetry: {tel['device_gaps']} seqs never reached the broker "
            f"(1 expected: the will's), {tel['device_dropped']} reported dropped; "
            f"{tel['fleet_missing']} the broker had are missing at the fleet (ingester reconnects; events "
            f"{tel['fleet_missing_events']}, of them not recovered: {tel['fleet_unrecovered_events']})")
    emit([row(f"soak {result['duration_s']:.0f} s: agent RSS growth after warm-up (MB)",
              summary["rss_growth_mb"], RSS_BOUND_MB, "MB", "", met=summary["rss_growth_mb"] <= RSS_BOUND_MB,
              note=note, ratio=summary["rss_growth_mb"] / RSS_BOUND_MB),
          row("soak: fds and threads flat, device telemetry lost beyond the bound", float(lost), 0.0,
              "seqs", "",
              met=flat and lost <= 0, note=note, ratio=0.0)])


if __name__ == "__main__":
    main()
