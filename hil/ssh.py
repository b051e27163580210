"""Real devices over SSH: the inventory file and the commands the harness sends.

    # inventory.toml
    [defaults]
    user = "pi"                      # ssh user (sudo without a password for the commands below)
    port = 22
    identity = "~/.ssh/hil_ed25519"
    interface = "eth0"               # where tc netem applies impairments
    config = "/etc/edgefleet/agent.toml"
    unit = "edgefleet-agent.service"
    [[devices]]
    id = "cam-01"                    # the device_id in its agent.toml
    host = "10.0.4.21"
    labels = { ring = "canary" }
    [[devices]]
    id = "cam-02"
    host = "cam-02.lab"
    user = "admin"

Power cuts are `systemctl kill --signal=SIGKILL` of the agent (a relay or smart plug hook
can replace it: ``power_cut_command``/``power_on_command`` per device, run locally); a full
disk is a file that fills the state directory's file system; link faults are tc netem.
Commands are built here as argv lists (tested without devices) and run by ``SshDevice``.
"""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.scenario import ScenarioError

DEVICE_KEYS = {"id", "host", "user", "port", "identity", "interface", "config", "unit", "labels",
               "state_dir", "power_cut_command", "power_on_command"}


@dataclass(frozen=True)
class InventoryDevice:
    id: str
    host: str
    user: str = "root"
    port: int = 22
    identity: str | None = None
    interface: str = "eth0"
    config: str = "/etc/edgefleet/agent.toml"
    unit: str = "edgefleet-agent.service"
    state_dir: str = "/var/lib/edgefleet"
    labels: dict[str, str] = field(default_factory=dict)
    power_cut_command: str | None = None
    power_on_command: str | None = None


def parse_inventory(data: dict[str, Any]) -> list[InventoryDevice]:
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ScenarioError("inventory: [defaults] must be a table")
    bad = sorted(set(defaults) - (DEVICE_KEYS - {"id", "host", "labels"}))
    if bad:
        raise ScenarioError(f"inventory: defaults.{bad[0]} is not a known key")
    raw = data.get("devices")
    if not isinstance(raw, list) or not raw:
        raise ScenarioError("inventory: no [[devices]]")
    out: list[InventoryDevice] = []
    for i, dev in enumerate(raw):
        where = f"inventory: devices[{i}]"
        if not isinstance(dev, dict):
            raise ScenarioError(f"{where} must be a table")
        bad = sorted(set(dev) - DEVICE_KEYS)
        if bad:
            raise ScenarioError(f"{where}.{bad[0]} is not a known key")
        merged = {**defaults, **dev}
        for key in ("id", "host"):
            if not isinstance(merged.get(key), str) or not merged[key]:
                raise ScenarioError(f"{where}.{key} is required")
        if not isinstance(merged.get("port", 22), int) or not 0 < merged.get("port", 22) < 65536:
            raise ScenarioError(f"{where}.port = {merged.get('port')!r} is not a port")
        if any(d.id == merged["id"] for d in out):
            raise ScenarioError(f"{where}.id = {merged['id']!r} appears twice")
        out.append(InventoryDevice(**merged))
    return out


def load_inventory(path: Path) -> list[InventoryDevice]:
    try:
        return parse_inventory(tomllib.loads(Path(path).read_text()))
    except OSError as exc:
        raise ScenarioError(f"cannot read inventory {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"inventory {path} is not valid TOML: {exc}") from None


class SshCommands:
    """The argv of every remote operation on one device (``ssh`` + a remote shell line)."""

    def __init__(self, dev: InventoryDevice, ssh: str = "ssh"):
        self.dev = dev
        self.ssh = ssh

    def ssh_argv(self, remote: str) -> list[str]:
        argv = [self.ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(self.dev.port)]
        if self.dev.identity:
            argv += ["-i", str(Path(self.dev.identity).expanduser())]
        return [*argv, f"{self.dev.user}@{self.dev.host}", "--", remote]

    def _sudo(self, *words: str) -> list[str]:
        return self.ssh_argv("sudo -n " + shlex.join(words))

    def start_agent(self) -> list[str]:
        return self._sudo("systemctl", "start", self.dev.unit)

    def stop_agent(self) -> list[str]:
        return self._sudo("systemctl", "stop", self.dev.unit)

    def power_cut(self) -> list[str]:
        if self.dev.power_cut_command:
            return shlex.split(self.dev.power_cut_command)
        return self._sudo("systemctl", "kill", "--signal=SIGKILL", self.dev.unit)

    def power_on(self) -> list[str]:
        if self.dev.power_on_command:
            return shlex.split(self.dev.power_on_command)
        return self._sudo("systemctl", "restart", self.dev.unit)

    def status(self) -> list[str]:
        return self._sudo("/opt/edgefleet/bin/edgefleet-agent", "--config", self.dev.config, "status",
                          "--json")

    def loss(self, percent: float) -> list[str]:
        return self._sudo("tc", "qdisc", "replace", "dev", self.dev.interface, "root", "netem", "loss",
                          f"{percent:g}%")

    def delay(self, ms: float) -> list[str]:
        return self._sudo("tc", "qdisc", "replace", "dev", self.dev.interface, "root", "netem", "delay",
                          f"{ms:g}ms")

    def clear_impairments(self) -> list[str]:
        return self.ssh_argv(f"sudo -n tc qdisc del dev {shlex.quote(self.dev.interface)} root || true")

    def link(self, up: bool) -> list[str]:
        """Link down for ``seconds`` must come back by itself: the SSH session rides on the link."""
        return self._sudo("ip", "link", "set", self.dev.interface, "up" if up else "down")

    def link_down_for(self, seconds: float) -> list[str]:
        iface = shlex.quote(self.dev.interface)
        return self.ssh_argv(f"sudo -n sh -c 'ip link set {iface} down; sleep {seconds:g}; "
                             f"ip link set {iface} up' >/dev/null 2>&1 &")

    def fill_disk(self, keep_kb: int = 64) -> list[str]:
        d = shlex.quote(self.dev.state_dir)
        return self.ssh_argv(
            f"sudo -n sh -c 'free=$(df -Pk {d} | awk \"NR==2 {{print \\$4}}\"); "
            f"fallocate -l $(( (free - {keep_kb}) * 1024 )) {d}/hil-filler'")

    def free_disk(self) -> list[str]:
        return self._sudo("rm", "-f", f"{self.dev.state_dir}/hil-filler")


class SshDevice:
    """Runs SshCommands; every call returns (ok, output) and never raises on a remote failure."""

    def __init__(self, dev: InventoryDevice, timeout: float = 30.0):
        self.dev = dev
        self.cmd = SshCommands(dev)
        self.timeout = timeout

    def run(self, argv: list[str]) -> tuple[bool, str]:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        return r.returncode == 0, (r.stdout + r.stderr).strip()
