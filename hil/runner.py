"""Runs one scenario: the real fleet (fleet.demo's DemoFleet), a real Mosquitto, one real
agent process per emulated device (in its own network namespace when allowed), a first
rollout of r1 to every device, then the scenario's staged rollout with its faults.
Returns the report (hil.report) with a verdict."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleet.bundles.build import build_bundle
from fleet.demo.models import golden_inputs, write_classifier
from fleet.demo.processes import ManagedProcess, free_port, python_module, wait_until
from fleet.demo.scenario import MODEL, TERMINAL, DemoConfig, DemoFleet, gates
from hil.evidence import SpoolPosition, records_since, spool_cursor, spool_end
from hil.lab import GATEWAY, Capabilities, LabError, MosquittoBroker, NetLab, TmpfsDisk, probe
from hil.scenario import UNDO, Fault, Scenario, ScenarioError, resolve_devices
from shared.bundle.keyring import load_keyring

CUT_POLL_S = 0.002  # how often a power cut waiting for a state reads the device's state file
SPOOL_DRAIN_S = 30.0  # how long the run waits for the spools to drain what an outage left in them
# A loss kept to the end is read once it should have dropped this many packets (so that none
# dropped means a rule that does not work, not chance: (1 - p)^n < e^-12), or after LOSS_SAMPLE_S.
LOSS_EXPECTED_DROPS = 12
LOSS_SAMPLE_S = 30.0


@dataclass
class DeviceRun:
    id: str
    home: Path
    api_url: str
    proc: ManagedProcess
    addr: str = "127.0.0.1"
    disk: TmpfsDisk | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    last_state: tuple[str, int | None] | None = None
    seen_states: set[str] = field(default_factory=set)
    cut_at: float | None = None  # monotonic time of the last power cut, while it is off

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.home / "state" / "models" / f"{MODEL}.json").read_text())
        except (OSError, ValueError):
            return None


def agent_toml(device: str, *, state_dir: str, trust_root: str, fleet_url: str, mqtt_url: str,
               enroll_token: str, labels: dict[str, str], listen: str) -> str:
    """The agent.toml of one HIL device: short intervals so that a scenario takes seconds."""
    labels_toml = ", ".join(f"{k} = {json.dumps(v)}" for k, v in labels.items())
    return (
        f"device_id = {json.dumps(device)}\n"
        f"state_dir = {json.dumps(state_dir)}\n"
        f"trust_root = {json.dumps(trust_root)}\n"
        f"[fleet]\n"
        f"url = {json.dumps(fleet_url)}\n"
        f"enrollment_token = {json.dumps(enroll_token)}\n"
        f"labels = {{ {labels_toml} }}\n"
        f"poll_interval_s = 2.0\n"
        f"[mqtt]\n"
        f"url = {json.dumps(mqtt_url)}\n"
        f"health_interval_s = 1.0\n"
        f"[api]\n"
        f"listen = {json.dumps(listen)}\n"
        f"[update]\n"
        f"trial_seconds = 2.0\n"
        f"trial_max_restarts = 2\n"
        f"download_backoff_max_s = 2.0\n"
        f"download_stall_window_s = 5.0\n"
        f"retry_failed_s = 2.0\n"
        f"retry_failed_max_s = 4.0\n"
        f"disk_margin_mb = 2.0\n"
    )


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


class HilFleet(DemoFleet):
    """DemoFleet listening where namespaced devices reach it (the bridge), not only loopback."""

    def __init__(self, cfg: DemoConfig, host: str):
        super().__init__(cfg)
        self.host = host

    def start_fleet(self) -> None:
        argv = python_module(
            "fleet.cli.main", "serve", "--host", self.host, "--port", str(self.fleet_port),
            "--data-dir", str(self.work / "fleet"), "--keys", str(self.work / "keys"),
            f"--admin-token={self.admin_token}", f"--enrollment-token={self.enroll_token}",
            "--mqtt-url", str(self.cfg.mqtt_url),
        )
        self.fleet = ManagedProcess("fleet", argv, self.work / "logs" / "fleet.log").start()
        try:
            wait_until(lambda: self.http.get("/healthz").status_code == 200, timeout=60, what="the fleet")
        except TimeoutError:
            raise RuntimeError(f"the fleet did not start; its log ends:\n{self.fleet.tail()}") from None


class HilRun:
    def __init__(self, scenario: Scenario, report_dir: Path, *, mode: str = "auto",
                 narrate: Callable[[str], None] = print, caps: Capabilities | None = None):
        self.sc = scenario
        self.report_dir = Path(report_dir).resolve()
        self.work = self.report_dir / "run"
        self.narrate = narrate
        self.caps = caps or probe()
        if mode == "netns" and not self.caps.netns:
            raise ScenarioError(f"--mode netns: {self.caps.reasons.get('netns')}")
        self.mode = "netns" if mode in ("auto", "netns") and self.caps.netns else "process"
        netns_reason = self.caps.reasons.get("netns", "no network namespaces")
        self.why_process = "" if self.mode == "netns" else (
            "--mode process" if mode == "process" else netns_reason)
        self.t0 = time.monotonic()
        self.rollout_t0: float | None = None
        self.rollout_end: float | None = None
        self.devices: dict[str, DeviceRun] = {}
        self.faults_log: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.net: NetLab | None = None
        self.broker: MosquittoBroker | None = None
        self.fleet: HilFleet | None = None
        self.pending: list[tuple[Fault, str]] = []  # (fault, device or "") not applied yet
        self.undo: list[tuple[float, str, str, Fault]] = []  # (due, action, device, fault)
        self.lock = threading.RLock()  # the cut watcher applies faults from its own thread
        self.outage: dict[str, Any] | None = None  # the broker_stop entry's evidence
        self.stop_watch = threading.Event()  # ends the cut watcher (also on an error: _teardown)
        self.loss_entries: dict[str, dict[str, Any]] = {}  # device -> its loss entry (counters read later)
        self.loss_asked: dict[str, float] = {}  # device -> the loss in effect, percent

    def say(self, text: str) -> None:
        self.narrate(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    # -- setup ------------------------------------------------------------------------
    def _build_new_release(self, keys_dir: Path) -> Path:
        """r3, healthy (the faulty r2 comes from DemoFleet.build_bundles)."""
        model = self.work / "model-r3.onnx"
        write_classifier(model, faulty=False, seed=3)
        out = self.work / f"{MODEL}-r3.bundle"
        build_bundle(model, name=MODEL, version="1.2.0", release=3, keyring=load_keyring(keys_dir), out=out,
                     golden_inputs=golden_inputs())
        return out

    def _start_devices(self, fleet: HilFleet) -> None:
        assert self.broker is not None
        ids = self.sc.device_ids()
        disk_devices = {d for f in self.sc.faults if f.action == "disk_full"
                        for d in resolve_devices(f.devices, ids, self.sc.canary)}
        for index, device in enumerate(ids, start=1):
            home = self.work / "devices" / device
            (home / "state").mkdir(parents=True, exist_ok=True)
            disk = None
            size = self.sc.disk_mb or (16 if device in disk_devices else 0)
            if size:
                if self.caps.tmpfs:
                    disk = TmpfsDisk(home / "state", size)
                else:
                    self.skipped.append({"what": f"tmpfs state_dir for {device}",
                                         "why": self.caps.reasons.get("tmpfs", "")})
            addr = "127.0.0.1"
            if self.net is not None:
                addr = self.net.add_device(device, index)
            fleet_host = GATEWAY if self.net is not None else "127.0.0.1"
            api_port = free_port()
            labels = {"site": "lab", "ring": "canary" if device in self.sc.canary else "main"}
            (home / "agent.toml").write_text(agent_toml(
                device, state_dir=str(home / "state"), trust_root=str(self.work / "keys" / "root.json"),
                fleet_url=f"http://{fleet_host}:{fleet.fleet_port}",
                mqtt_url=f"mqtt://{fleet_host}:{self.broker.port}", enroll_token=fleet.enroll_token,
                labels=labels, listen=f"{addr}:{api_port}"))
            argv = python_module("agent", "--config", str(home / "agent.toml"), "run")
            if self.net is not None:
                argv = self.net.wrap(device, argv)
            proc = ManagedProcess(device, argv, self.work / "logs" / f"{device}.log").start()
            self.devices[device] = DeviceRun(device, home, f"http://{addr}:{api_port}", proc, addr, disk)
        for device, dev in self.devices.items():
            try:
                wait_until(lambda d=device: fleet.http.get(f"/api/v1/devices/{d}").status_code == 200,
                           timeout=60, what=f"{device} to enroll")
            except TimeoutError:
                raise RuntimeError(f"{device} did not enroll; its log ends:\n{dev.proc.tail()}") from None
            fleet.agent_api[device] = dev.api_url
        self.say(f"{len(self.devices)} agents enrolled ({self.mode} mode)")

    # -- faults -----------------------------------------------------------------------
    def _apply(self, action: str, device: str, fault: Fault, note: str = "") -> None:
        with self.lock:
            self._apply_locked(action, device, fault, note)

    def _apply_locked(self, action: str, device: str, fault: Fault, note: str) -> None:
        now = time.monotonic()
        entry: dict[str, Any] = {"t": round(now - self.t0, 2), "action": action, "device": device or None,
                                 "primary": action == fault.action, "evidence": {}}
        if entry["primary"]:  # what the scenario asked, for the judgement of the evidence
            entry["asked"] = {"when_state": fault.when_state, "value": fault.value,
                              "after_rollout": fault.after_rollout}
        if note:
            entry["trigger"] = note
        try:
            entry["result"] = self._do(action, device, fault, entry["evidence"])
        except LabError as exc:
            entry["skipped"] = str(exc)
            self.skipped.append({"what": f"{action} {device}".strip(), "why": str(exc)})
        self.faults_log.append(entry)
        if device:
            self.devices[device].events.append(entry)
        trigger = f" ({note})" if note else ""
        self.say(f"fault {action} {device}{trigger}: {entry.get('result') or 'skipped: ' + entry['skipped']}")
        if fault.duration_s is not None and action in UNDO and "skipped" not in entry:
            self.undo.append((now + fault.duration_s, UNDO[action], device, fault))

    def _do(self, action: str, device: str, fault: Fault, evidence: dict[str, Any]) -> str:
        dev = self.devices.get(device)
        if action == "broker_stop":
            return self._broker_stop(evidence)
        if action == "broker_start":
            assert self.broker is not None
            self._spools_at_outage_end()
            return self.broker.start()
        assert dev is not None
        if action == "power_cut":
            return self._power_cut(dev, evidence)
        if action == "power_on":
            if dev.proc.alive():
                return "already running"
            if dev.cut_at is not None:
                evidence["off_s"] = round(time.monotonic() - dev.cut_at, 2)
                evidence["off_through_rollout_end"] = (self.rollout_end is not None
                                                       and dev.cut_at < self.rollout_end)
            dev.cut_at = None
            dev.proc.start()
            return "agent started again (power on)"
        if action == "disk_full":
            if dev.disk is None:
                raise LabError(f"no tmpfs state_dir: {self.caps.reasons.get('tmpfs', 'not mounted')}")
            result = dev.disk.fill()
            st = os.statvfs(dev.disk.path)
            evidence["free_kib"] = st.f_bavail * st.f_frsize // 1024
            return result
        if self.net is None:
            raise LabError(f"{action} needs a network namespace per device ({self.why_process})")
        if action in ("link_down", "offline"):
            return self.net.link(device, up=False)
        if action in ("link_up", "online"):
            return self.net.link(device, up=True)
        if action == "loss":
            result = self.net.loss(device, float(fault.value or 0))
            self.loss_entries[device] = evidence
            self.loss_asked[device] = float(fault.value or 0)
            return result
        if action in ("loss_clear", "delay_clear"):
            self._read_loss(device)
            return self.net.loss_clear(device)
        if action == "delay":
            return self.net.delay(device, float(fault.value or 0))
        raise LabError(f"unknown action {action}")

    def _power_cut(self, dev: DeviceRun, evidence: dict[str, Any]) -> str:
        """SIGKILL to the agent's whole process group (it runs in its own session), then the
        state file as the cut left it: the state the device was in when its power went."""
        proc = dev.proc.proc
        if proc is None or proc.poll() is not None:
            raise LabError("the agent was not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        dev.cut_at = time.monotonic()
        deadline = time.monotonic() + 2
        while (survivors := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        st = dev.read_state() or {}
        evidence.update({"state_at_cut": st.get("state"),
                         "active_release": (st.get("active") or {}).get("release"),
                         "target_release": (st.get("target") or {}).get("release"),
                         "survivors": survivors or None})
        return f"SIGKILL to the agent's process group (power cut) in state {st.get('state')}"

    def _broker_stop(self, evidence: dict[str, Any]) -> str:
        assert self.broker is not None
        result = self.broker.stop()
        with socket.socket() as s:
            s.settimeout(1)
            evidence["port_closed"] = s.connect_ex(("127.0.0.1", self.broker.port)) != 0
        evidence["spools"] = {d: {"start": self._spool_end(dev), "spooled": None, "end": None,
                                  "cursor_after": None} for d, dev in self.devices.items()}
        self.outage = evidence
        return result

    def _spools_at_outage_end(self) -> None:
        """Just before the broker comes back: the records each device's spool took since the stop
        (a segment holding one of them is kept until the broker acknowledged it, so all are there)."""
        if self.outage is None:
            return
        for device, dev in self.devices.items():
            figures = self.outage["spools"][device]
            if figures["start"] is not None:
                figures["spooled"] = self._records_since(dev, figures["start"])
                figures["end"] = self._spool_end(dev)

    def _spools_after_outage(self, timeout: float = SPOOL_DRAIN_S) -> None:
        """Each device's spool cursor once it acknowledged what it spooled during the outage, or
        as it is at ``timeout``: the agents reconnect with back-off (and through any loss still in
        effect), so converging on releases can come before the spool has drained."""
        if self.outage is None:
            return
        spools = self.outage["spools"]
        deadline = time.monotonic() + timeout
        while True:
            for device, dev in self.devices.items():
                spools[device]["cursor_after"] = self._spool_cursor(dev)
            drained = all(s.get("end") is None or (s["cursor_after"] is not None
                                                   and tuple(s["cursor_after"]) >= tuple(s["end"]))
                          for s in spools.values())
            if drained or time.monotonic() >= deadline:
                return
            time.sleep(0.2)

    # the spool on the device's disk (hil.evidence); SshRun has no local disk to read
    def _spool_end(self, dev: DeviceRun) -> SpoolPosition | None:
        return spool_end(dev.home / "state")

    def _spool_cursor(self, dev: DeviceRun) -> SpoolPosition | None:
        return spool_cursor(dev.home / "state")

    def _records_since(self, dev: DeviceRun, start: SpoolPosition) -> int:
        return records_since(dev.home / "state", start)

    def _read_loss(self, device: str) -> None:
        """The loss counters of a device, read before its loss is cleared."""
        evidence = self.loss_entries.pop(device, None)
        if evidence is None:
            return
        try:
            evidence.update(self._loss_stats(device))
        except LabError as exc:
            evidence["error"] = str(exc)

    def _loss_stats(self, device: str) -> dict[str, Any]:
        assert self.net is not None
        return self.net.loss_stats(device)

    def _await_loss_samples(self) -> None:
        """Wait until each loss kept to the end has seen LOSS_EXPECTED_DROPS / p packets (a short
        scenario gave a device 36 packets at 20 %: none dropped by chance 3 times in 10,000), at
        most LOSS_SAMPLE_S; the devices' health and keep-alives keep the links busy meanwhile."""
        waiting = {d: LOSS_EXPECTED_DROPS / (p / 100.0) for d, p in self.loss_asked.items()
                   if d in self.loss_entries and p > 0}
        deadline = time.monotonic() + LOSS_SAMPLE_S
        while waiting and time.monotonic() < deadline:
            for device, need in list(waiting.items()):
                try:
                    seen = int(self._loss_stats(device).get("packets") or 0)
                except LabError:
                    seen = need  # read (and reported) by _read_loss
                if seen >= need:
                    del waiting[device]
            if waiting:
                time.sleep(0.5)

    def _watch_cuts(self, stop: threading.Event) -> None:
        """Power cuts that wait for a state: read each such device's state file every
        CUT_POLL_S and cut the moment it shows the state, so the cut lands in it."""
        while not stop.is_set():
            with self.lock:
                waiting = [(f, d) for f, d in self.pending if f.when_state is not None]
            if not waiting:
                return
            for item in waiting:
                fault, device = item
                st = self.devices[device].read_state() or {}
                if st.get("state") == fault.when_state:
                    with self.lock:
                        if item in self.pending:
                            self.pending.remove(item)
                            self._apply(fault.action, device, fault, f"state file showed {fault.when_state}")
            time.sleep(CUT_POLL_S)

    def _tick_faults(self) -> None:
        now = time.monotonic()
        with self.lock:
            for item in list(self.pending):
                fault, device = item
                base = self.rollout_end if fault.after_rollout else self.rollout_t0
                if base is None or fault.when_state is not None:  # the cut watcher fires those
                    continue
                if fault.at_s is not None and now - base >= fault.at_s:
                    self.pending.remove(item)
                    self._apply(fault.action, device, fault)
            for item in sorted(self.undo):
                if item[0] <= now:
                    self.undo.remove(item)
                    self._apply(item[1], item[2], item[3])

    def _poll_devices(self) -> None:
        for dev in self.devices.values():
            st = dev.read_state()
            if st is None:
                continue
            cur = (st.get("state", "?"), (st.get("active") or {}).get("release"))
            if cur != dev.last_state:
                dev.last_state = cur
                dev.seen_states.add(cur[0])
                ev = {"t": round(time.monotonic() - self.t0, 2), "state": cur[0], "active_release": cur[1]}
                if st.get("reason"):
                    ev["reason"] = st["reason"]
                dev.events.append(ev)

    # -- run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from hil.report import build_report

        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        result: dict[str, Any] = {}
        error = None
        try:
            bind = "127.0.0.1" if self.mode == "process" else "0.0.0.0"  # netns, ssh: devices reach us
            self.broker = MosquittoBroker(self.work, bind=bind)
            self.broker.start()
            cfg = DemoConfig(workdir=self.work, agents=self.sc.devices,
                             mqtt_url=f"mqtt://127.0.0.1:{self.broker.port}", health_interval_s=1.0,
                             narrate=lambda line: None)
            fleet = self.fleet = HilFleet(cfg, bind)
            bundles = fleet.build_bundles()
            new_bundle = bundles["1.1.0"] if self.sc.release == "faulty" else self._build_new_release(
                self.work / "keys")
            if self.mode == "netns":
                self.net = NetLab(self.caps, (fleet.fleet_port, self.broker.port))
                self.net.setup_bridge()
            fleet.start_fleet()
            self.say(f"fleet at {fleet.fleet_url}, Mosquitto on {self.broker.port}")
            self._start_devices(fleet)
            v1 = fleet.upload(bundles["1.0.0"])
            v_new = fleet.upload(new_bundle)
            fleet.start_traffic()
            first = fleet.rollout({
                "name": "r1 everywhere", "bundle_id": v1["id"], "selector": {"site": "lab"},
                "stages": [{"name": "all", "percent": 100, "bake_seconds": 0}],
                "gates": gates(5), "on_gate_failure": "rollback",
                # a loaded machine may gather the sample slowly: wait for it rather than pause
                "on_inconclusive": "extend", "extend_seconds": 5, "max_extensions": 12,
            }, timeout=90)
            if first["state"] != "succeeded":
                raise RuntimeError(f"the first rollout (r1) did not succeed: {first.get('reason')}")
            self.say("r1 serves on every device; the scenario's rollout starts")
            ids = self.sc.device_ids()
            for fault in self.sc.faults:
                targets = [""] if fault.action.startswith("broker") else resolve_devices(
                    fault.devices, ids, self.sc.canary)
                self.pending += [(fault, d) for d in targets]
            # every rollout key of the scenario, on_inconclusive and its extensions included
            spec = {**self.sc.rollout, "name": self.sc.name, "bundle_id": v_new["id"],
                    "selector": {"site": "lab"}, "gates": {**gates(30), **self.sc.rollout["gates"]}}
            created = fleet.check(fleet.http.post("/api/v1/rollouts", json=spec))
            rid = created["id"]
            self._poll_devices()
            fleet.check(fleet.http.post(f"/api/v1/rollouts/{rid}/start"))
            self.rollout_t0 = time.monotonic()
            deadline = self.rollout_t0 + self.sc.timeout_s
            status = created
            last_poll = 0.0
            watcher = threading.Thread(target=self._watch_cuts, args=(self.stop_watch,),
                                       name="hil-cut-watcher", daemon=True)
            watcher.start()
            while time.monotonic() < deadline:
                self._poll_devices()
                self._tick_faults()
                if time.monotonic() - last_poll > 0.5:
                    last_poll = time.monotonic()
                    try:
                        status = fleet.check(fleet.http.get(f"/api/v1/rollouts/{rid}"))
                    except (httpx.HTTPError, RuntimeError) as exc:
                        self.say(f"rollout status not available: {exc}")
                    if status["state"] in TERMINAL and self.rollout_end is None:
                        self.rollout_end = time.monotonic()
                        self.say(f"rollout {rid} ended: {status['state']} {status.get('reason') or ''}")
                if self.rollout_end is not None and not self.pending and not self.undo:
                    break
                time.sleep(0.1)
            self.stop_watch.set()
            watcher.join(5)
            if self.rollout_end is None:
                self.say(f"rollout {rid} still {status['state']} after {self.sc.timeout_s:.0f}s")
            # Undo what is still in effect, bring every device back, then let them converge.
            for _, action, device, fault in sorted(self.undo):
                self._apply(action, device, fault)
            self.undo.clear()
            for fault, device in self.pending:
                why = (f"the device's state file never showed {fault.when_state}" if fault.when_state
                       else "its time never came before the end")
                self.skipped.append({"what": f"{fault.action} {device}".strip(), "why": why})
                self.faults_log.append({"t": None, "action": fault.action, "device": device or None,
                                        "primary": True, "evidence": {}, "skipped": why,
                                        "asked": {"when_state": fault.when_state, "value": fault.value,
                                                  "after_rollout": fault.after_rollout}})
            self.pending.clear()
            for dev in self.devices.values():
                if not self._alive(dev):
                    self._apply("power_on", dev.id, Fault("power_on"))
            result = {"rollout": fleet.check(fleet.http.get(f"/api/v1/rollouts/{rid}")),
                      "first_rollout_id": first["id"], "bundles": {"r1": v1, "new": v_new}}
            result["converged"] = self._settle(fleet, timeout=30)
            self._spools_after_outage()
            self._await_loss_samples()
            for device in list(self.loss_entries):  # a loss kept to the end: its counters now
                self._read_loss(device)
            result["rollout"] = fleet.check(fleet.http.get(f"/api/v1/rollouts/{rid}"))
            listed = fleet.check(fleet.http.get("/api/v1/devices"))
            result["fleet_devices"] = {d["device_id"]: d for d in listed}
            result["fleet_bundles"] = fleet.check(fleet.http.get("/api/v1/bundles"))
            result["traffic"] = {d: {"ok": g.stats.ok, "errors": g.stats.errors, "releases": g.stats.releases}
                                 for d, g in fleet.traffic.items()}
            result["agents"] = {d: self._agent_view(dev) for d, dev in self.devices.items()}
        except (RuntimeError, TimeoutError, LabError, ScenarioError, httpx.HTTPError) as exc:
            error = str(exc)
            self.say(f"error: {error}")
        finally:
            self._teardown()
        return build_report(self, result, error)

    def _alive(self, dev: DeviceRun) -> bool:
        return dev.proc.alive()

    def _agent_view(self, dev: DeviceRun) -> dict[str, Any]:
        view: dict[str, Any] = {"state_file": dev.read_state()}
        try:
            models = httpx.get(f"{dev.api_url}/v1/models", timeout=5).json()
            entries = models.get("models", models) if isinstance(models, dict) else models
            view["api_release"] = next((int(m["release"]) for m in entries if m["name"] == MODEL), None)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            view["api_error"] = str(exc)
        return view

    def _settle(self, fleet: HilFleet, timeout: float) -> bool:
        """Wait until each agent's active release is what the fleet assigns it and reports."""
        def agreed() -> bool:
            devices = {d["device_id"]: d for d in fleet.check(fleet.http.get("/api/v1/devices"))}
            for device, dev in self.devices.items():
                st = dev.read_state() or {}
                active = (st.get("active") or {}).get("release")
                assigned = (devices[device].get("assigned") or {}).get(MODEL, {}).get("release")
                if active is None or active != assigned or st.get("state") not in ("committed", "idle",
                                                                                    "rolled_back", "failed"):
                    return False
            return True
        def reported() -> bool:
            """The fleet's record of what each device serves (from its telemetry) caught up."""
            devices = {d["device_id"]: d for d in fleet.check(fleet.http.get("/api/v1/devices"))}
            for device, dev in self.devices.items():
                active = ((dev.read_state() or {}).get("active") or {}).get("release")
                seen = (devices[device].get("models") or {}).get(MODEL) or {}
                if (seen.get("release") if isinstance(seen, dict) else seen) != active:
                    return False
            return True

        try:
            wait_until(agreed, timeout=timeout, interval=0.5, what="devices to converge")
        except (TimeoutError, RuntimeError):
            return False
        # The fleet learns what a device serves from its telemetry, which a lossy link or a
        # broker just back (its spool draining) delays: wait for it instead of a fixed pause.
        # Not catching up is the report's "fleet view matches devices" check, not this one.
        with contextlib.suppress(TimeoutError, RuntimeError):
            wait_until(reported, timeout=timeout, interval=0.5, what="the fleet's view to catch up")
        time.sleep(2.5)  # one more health report each, so the fleet's view is fresh
        return True

    def _teardown(self) -> None:
        self.stop_watch.set()
        if self.fleet is not None:
            self.fleet.stop()
        for dev in self.devices.values():
            dev.proc.stop()
        if self.broker is not None:
            self.broker.stop()
        for dev in self.devices.values():
            if dev.disk is not None:
                dev.disk.close()
        if self.net is not None:
            self.net.close()
