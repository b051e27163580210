"""``--mode ssh``: the same scenarios against real devices from an inventory (hil/ssh.py).

The harness runs the fleet and Mosquitto here, listening on every address; each device is
reached over SSH, gets an agent.toml pointing at ``harness_address``, and its agent is started
(systemd unit or command). The scenario's dev-01, dev-02, ... are the inventory's devices in
order (their inventory ids are used everywhere, the mapping is in the report); the scenario's
``devices`` count is ignored. Per device the harness keeps a shared SSH connection, a thread
that polls the agent's state file, and an ``ssh -L`` tunnel to the agent's local API for the
traffic generator and the final check. Faults go through SshCommands; a broker outage stays
here. A device that does not answer ``ssh true`` is reported as unreachable and left out (the
verdict fails); with none reachable the report says so and nothing starts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from fleet.demo.processes import ManagedProcess, free_port, wait_until
from fleet.demo.scenario import MODEL
from hil.evidence import (
    SpoolPosition,
    count_records,
    parse_netem_stats,
    parse_nft_counters,
    parse_spool_listing,
)
from hil.lab import Capabilities, LabError
from hil.runner import DeviceRun, HilFleet, HilRun, agent_toml
from hil.scenario import Fault, Scenario, ScenarioError
from hil.ssh import Inventory, SshDevice


def map_scenario(sc: Scenario, inventory_ids: list[str], reachable: list[str]) -> tuple[Scenario, list[str]]:
    """The scenario with dev-NN replaced by the N-th inventory device, restricted to the
    reachable ones; also what was dropped (a fault on unreachable devices only), as sentences."""
    mapping = {f"dev-{i:02d}": dev for i, dev in enumerate(inventory_ids, start=1)}
    dropped: list[str] = []

    def real(ids: tuple[str, ...], where: str) -> tuple[str, ...]:
        unknown = [d for d in ids if d not in mapping and d not in inventory_ids]
        if unknown:
            raise ScenarioError(f"{where} names {unknown}, but the inventory has {len(inventory_ids)} "
                                f"devices (dev-01 .. dev-{len(inventory_ids):02d})")
        return tuple(mapping.get(d, d) for d in ids)

    canary = tuple(d for d in real(sc.canary, "canary") if d in reachable)
    faults = []
    for fault in sc.faults:
        if isinstance(fault.devices, tuple) and fault.devices:
            devs = tuple(d for d in real(fault.devices, f"fault {fault.action}") if d in reachable)
            if not devs:
                dropped.append(f"{fault.action} {', '.join(real(fault.devices, ''))}: unreachable")
                continue
            fault = replace(fault, devices=devs)
        faults.append(fault)
    return replace(sc, devices=len(reachable), ids=tuple(reachable), canary=canary,
                   faults=tuple(faults)), dropped


@dataclass
class SshDeviceRun(DeviceRun):
    """A real device: ``proc`` is the ssh tunnel to its API; its state comes from the poller."""

    remote: SshDevice | None = None
    state: dict[str, Any] | None = None
    agent_up: bool = False
    polls: int = 0
    poll_error: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def read_state(self) -> dict[str, Any] | None:
        return self.state

    def poll_forever(self, interval: float = 0.25) -> None:
        assert self.remote is not None
        argv = self.remote.cmd.poll(MODEL)
        while not self.stop.is_set():
            ok, out = self.remote.run(argv, timeout=20)
            if ok and "\n@@\n" in f"\n{out}\n":
                head, _, tail = f"\n{out}".rpartition("\n@@")
                with contextlib.suppress(ValueError):  # a torn read: the next poll has it
                    self.state = json.loads(head) if head.strip() else None
                self.agent_up = tail.strip() == "up"
                self.polls += 1
            else:
                self.poll_error = out
            self.stop.wait(interval)


class SshRun(HilRun):
    def __init__(self, scenario: Scenario, report_dir: Path, inventory: Inventory, *,
                 harness_address: str | None = None, inventory_path: Path | None = None,
                 ssh: str = "ssh", narrate: Any = print):
        super().__init__(scenario, report_dir, mode="process", narrate=narrate, caps=Capabilities())
        self.mode = "ssh"
        self.why_process = ""
        self.inventory = inventory
        self.inventory_path = str(inventory_path) if inventory_path else None
        self.harness_address = harness_address or inventory.harness_address
        self.ssh = ssh
        self.unreachable: dict[str, str] = {}
        self.device_map: dict[str, str] = {}
        self.control_dir: Path | None = None
        self.remotes: dict[str, SshDevice] = {}
        self.started_epoch = int(time.time())

    # -- before anything starts -----------------------------------------------------------
    def _reach(self) -> list[str]:
        """``ssh true`` on every device at once; the ones that answered, in inventory order."""
        self.control_dir = Path(tempfile.mkdtemp(prefix="efssh-"))  # short: a socket path
        for dev in self.inventory.devices:
            self.remotes[dev.id] = SshDevice(dev, ssh=self.ssh, control_dir=self.control_dir)
        results: dict[str, tuple[bool, str]] = {}

        def check(device: str) -> None:
            results[device] = self.remotes[device].run(self.remotes[device].cmd.check(), timeout=30)

        threads = [threading.Thread(target=check, args=(d,)) for d in self.remotes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for device, (ok, out) in results.items():
            if not ok:
                self.unreachable[device] = out.splitlines()[-1] if out else "ssh failed"
                self.say(f"{device} is unreachable: {self.unreachable[device]}")
        return [d.id for d in self.inventory.devices if d.id not in self.unreachable]

    def run(self) -> dict[str, Any]:
        from hil.report import build_report

        self.device_map = {f"dev-{i:02d}": d.id for i, d in enumerate(self.inventory.devices, start=1)}
        error = None
        if shutil.which(self.ssh) is None:
            error = f"{self.ssh} not found: install the Debian package openssh-client"
        elif not self.harness_address:
            error = ("no harness address: the devices need the address they reach this machine at "
                     "([harness] address in the inventory, or --harness-address)")
        else:
            reachable = self._reach()
            if not reachable:
                error = f"no device of the inventory is reachable over SSH ({len(self.unreachable)} tried)"
            else:
                try:
                    self.sc, dropped = map_scenario(self.sc, [d.id for d in self.inventory.devices],
                                                    reachable)
                except ScenarioError as exc:
                    error = str(exc)
                else:
                    self.skipped += [{"what": d.rsplit(":", 1)[0], "why": "the device is unreachable"}
                                     for d in dropped]
                    return super().run()
        self.say(f"error: {error}")
        self._close_masters()
        self.work.mkdir(parents=True, exist_ok=True)
        return build_report(self, {}, error)

    # -- devices ----------------------------------------------------------------------------
    def _start_devices(self, fleet: HilFleet) -> None:
        assert self.broker is not None
        root_json = (self.work / "keys" / "root.json").read_text()
        for device in self.sc.device_ids():
            remote = self.remotes[device]
            inv = remote.dev
            c = remote.cmd
            home = self.work / "devices" / device
            home.mkdir(parents=True, exist_ok=True)
            trust_root = str(PurePosixPath(inv.config).parent / "hil-root.json")
            labels = {**inv.labels, "site": "lab", "ring": "canary" if device in self.sc.canary else "main"}
            text = agent_toml(
                device, state_dir=inv.state_dir, trust_root=trust_root,
                fleet_url=f"http://{self.harness_address}:{fleet.fleet_port}",
                mqtt_url=f"mqtt://{self.harness_address}:{self.broker.port}", enroll_token=fleet.enroll_token,
                labels=labels, listen=f"127.0.0.1:{inv.api_port}")
            (home / "agent.toml").write_text(text)
            for what, argv, stdin in (
                ("stop the agent", c.stop_agent(), None),
                ("clear impairments", c.clear_impairments(), None),
                ("empty the state dir", c.reset_state(), None),
                (f"write {inv.config}", c.write_file(inv.config), text),
                (f"write {trust_root}", c.write_file(trust_root), root_json),
                ("start the agent", c.start_agent(), None),
            ):
                ok, out = remote.run(argv, stdin=stdin)
                if not ok and what != "stop the agent":
                    raise RuntimeError(f"{device}: cannot {what}: {out}")
            local = free_port()
            tunnel = ManagedProcess(f"{device}-tunnel", c.tunnel(local),
                                    self.work / "logs" / f"{device}-tunnel.log").start()
            dev = SshDeviceRun(device, home, f"http://127.0.0.1:{local}", tunnel, inv.host, remote=remote)
            dev.thread = threading.Thread(target=dev.poll_forever, name=f"poll-{device}", daemon=True)
            dev.thread.start()
            self.devices[device] = dev
            self.say(f"{device} ({inv.user}@{inv.host}): agent started ({inv.start})")
        for device, dev in self.devices.items():
            try:
                wait_until(lambda d=device: fleet.http.get(f"/api/v1/devices/{d}").status_code == 200,
                           timeout=60, what=f"{device} to enroll")
                port = int(dev.api_url.rsplit(":", 1)[1])
                wait_until(lambda p=port: _accepts(p), timeout=30, what=f"the ssh tunnel to {device}'s API")
            except TimeoutError as exc:
                assert isinstance(dev, SshDeviceRun) and dev.remote is not None
                _, log = dev.remote.run(dev.remote.cmd.logs(self.started_epoch, 30))
                raise RuntimeError(f"{exc}; the agent's log ends:\n{log}\n{dev.proc.tail()}") from None
            fleet.agent_api[device] = dev.api_url
        self.say(f"{len(self.devices)} agents enrolled (ssh mode)")

    def _alive(self, dev: DeviceRun) -> bool:
        """Asked now, not from the poller (whose last answer may predate a power on)."""
        assert isinstance(dev, SshDeviceRun) and dev.remote is not None
        ok, out = dev.remote.run(dev.remote.cmd.ssh_argv(dev.remote.cmd.alive_line()))
        return ok and out.strip() == "up"

    def _do(self, action: str, device: str, fault: Fault, evidence: dict[str, Any]) -> str:
        if action in ("broker_stop", "broker_start"):
            return super()._do(action, device, fault, evidence)
        dev = self.devices[device]
        assert isinstance(dev, SshDeviceRun) and dev.remote is not None and self.fleet and self.broker
        remote, c = dev.remote, dev.remote.cmd

        def run(argv: list[str], done: str) -> str:
            ok, out = remote.run(argv)
            if not ok:
                raise LabError(f"{action} on {device} failed: {out or 'no output'}")
            return out or done

        if action == "power_cut":
            out = run(c.power_cut(), "SIGKILL over ssh (power cut)")
            dev.agent_up = False
            dev.cut_at = time.monotonic()
            deadline = time.monotonic() + 3  # the state file as the cut left it, once all is dead
            while True:
                ok, polled = remote.run(c.poll(MODEL))
                head, _, tail = f"\n{polled}".rpartition("\n@@")
                if tail.strip() != "up" or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            try:
                st = json.loads(head) if ok and head.strip() else {}
            except ValueError:
                st = {}
            evidence.update({"state_at_cut": st.get("state"),
                             "active_release": (st.get("active") or {}).get("release"),
                             "survivors": "the agent still runs" if tail.strip() == "up" else None})
            return out
        if action == "power_on":
            if self._alive(dev):
                return "already running"
            out = run(c.power_on(), "agent started again over ssh (power on)")
            dev.agent_up = True
            return out
        if action == "disk_full":
            return run(c.fill_disk(), "disk filled")
        if action == "loss":
            out = run(c.loss(float(fault.value or 0), (self.fleet.fleet_port, self.broker.port)), "loss")
            self.loss_entries[device] = evidence
            self.loss_asked[device] = float(fault.value or 0)
            return out
        if action == "delay":
            return run(c.delay(float(fault.value or 0)), f"netem delay {fault.value} ms")
        if action in ("loss_clear", "delay_clear"):
            self._read_loss(device)
            return run(c.clear_impairments(), "impairments cleared")
        if action in ("link_down", "offline"):
            if fault.duration_s is None:
                raise LabError(f"{action} over SSH needs duration_s: the device must bring its link back")
            return run(c.link_down_for(fault.duration_s),
                       f"link {dev.remote.dev.interface} down for {fault.duration_s:g} s (on the device)")
        if action in ("link_up", "online"):
            try:
                wait_until(lambda: remote.run(c.check(), timeout=15)[0], timeout=60,
                           what=f"{device} over ssh")
            except TimeoutError as exc:
                raise LabError(f"{device} did not come back after its link cut: {exc}") from None
            return "link back (the device restored it); reachable over ssh"
        raise LabError(f"unknown action {action}")

    def _loss_stats(self, device: str) -> dict[str, Any]:
        remote = self.remotes[device]
        ok, out = remote.run(remote.cmd.loss_stats())
        if not ok:
            raise LabError(f"loss counters of {device}: {out or 'no output'}")
        tc, _, nft = out.partition("@@")
        if "netem" in tc:
            seen, dropped = parse_netem_stats(tc)
            return {"mechanism": "netem", "packets": seen, "dropped": dropped}
        seen, dropped = parse_nft_counters(nft)
        return {"mechanism": "nftables", "packets": seen, "dropped": dropped}

    # the spool on the device, read over ssh (hil.evidence has the format)
    def _spool_listing(self, dev: DeviceRun) -> tuple[SpoolPosition | None, list[tuple[int, int]]]:
        assert isinstance(dev, SshDeviceRun) and dev.remote is not None
        ok, out = dev.remote.run(dev.remote.cmd.spool_listing())
        return parse_spool_listing(out) if ok else (None, [])

    def _spool_end(self, dev: DeviceRun) -> SpoolPosition | None:
        segments = self._spool_listing(dev)[1]
        return segments[-1] if segments else None

    def _spool_cursor(self, dev: DeviceRun) -> SpoolPosition | None:
        return self._spool_listing(dev)[0]

    def _records_since(self, dev: DeviceRun, start: SpoolPosition) -> int:
        assert isinstance(dev, SshDeviceRun) and dev.remote is not None
        n = 0
        for seg, _size in self._spool_listing(dev)[1]:
            if seg < start[0]:
                continue
            ok, out = dev.remote.run(dev.remote.cmd.spool_tail(seg, start[1] if seg == start[0] else 0))
            if ok:
                with contextlib.suppress(ValueError):
                    n += count_records(base64.b64decode(out.strip()))[0]
        return n

    def _agent_view(self, dev: DeviceRun) -> dict[str, Any]:
        view = super()._agent_view(dev)
        assert isinstance(dev, SshDeviceRun) and dev.remote is not None
        remote = dev.remote
        ok, out = remote.run(remote.cmd.status())
        if ok:
            try:
                models = json.loads(out)["models"]
                record = next((m for m in models if m.get("name") == MODEL), {})
                view["status_release"] = (record.get("active") or {}).get("release")
                view["status_state"] = record.get("state")
            except (ValueError, KeyError, TypeError) as exc:
                view["status_error"] = f"{exc}: {out[:200]}"
        else:
            view["status_error"] = out
        ok, log = remote.run(remote.cmd.logs(self.started_epoch))
        path = self.work / "logs" / f"{dev.id}.log"
        path.write_text(log + "\n")
        view["log"] = str(path)
        view["polls"] = dev.polls
        return view

    def _teardown(self) -> None:
        for dev in self.devices.values():
            if isinstance(dev, SshDeviceRun):
                dev.stop.set()
        for dev in self.devices.values():
            if isinstance(dev, SshDeviceRun) and dev.thread is not None:
                dev.thread.join(30)
        for device, remote in self.remotes.items():
            if device in self.unreachable:
                continue
            c = remote.cmd
            for argv in (c.stop_agent(), c.clear_impairments(), c.free_disk()):
                remote.run(argv)
        super()._teardown()
        self._close_masters()

    def _close_masters(self) -> None:
        for remote in self.remotes.values():
            remote.run(remote.cmd.close_master(), timeout=10)
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
