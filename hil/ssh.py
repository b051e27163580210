"""Real devices over SSH: the inventory file and the commands the harness sends.

    # inventory.toml
    [harness]
    address = "10.0.4.1"             # where the devices reach this machine (fleet and broker);
                                     # python -m hil run --harness-address overrides it
    [defaults]
    user = "pi"                      # ssh user (sudo without a password unless it is root)
    port = 22
    identity = "~/.ssh/hil_ed25519"
    ssh_options = ["-o", "UserKnownHostsFile=~/.ssh/hil_known_hosts"]   # extra ssh arguments
    interface = "eth0"               # where tc netem applies impairments
    start = "systemd"                # systemd: the installed .deb's unit; command: agent_command run
    config = "/etc/edgefleet/agent.toml"
    unit = "edgefleet-agent.service"
    agent_command = "/opt/edgefleet/bin/edgefleet-agent"
    state_dir = "/var/lib/edgefleet"
    api_port = 8181                  # the agent's local API (127.0.0.1 on the device; tunnelled)
    [[devices]]
    id = "cam-01"                    # becomes the agent's device_id
    host = "10.0.4.21"
    labels = { ring = "canary" }
    [[devices]]
    id = "cam-02"
    host = "cam-02.lab"
    user = "admin"

The harness owns the devices while a scenario runs (lab devices only): it stops the agent,
empties ``state_dir``, writes ``config`` (and the run's trust root next to it, ``hil-root.json``)
pointing at its own fleet and broker, then starts the agent: ``systemctl restart unit``
(start = "systemd") or ``agent_command --config CONFIG run`` in its own process group, its
output in ``STATE_DIR.log`` and its group id in ``STATE_DIR.pid`` (start = "command").

Power cuts are SIGKILL of the agent (``systemctl kill`` or of the command's process group; a
relay or smart plug hook can replace it: ``power_cut_command``/``power_on_command`` per device,
run locally); a full disk is a file that fills the state directory's file system (refused
when that has more than ``max_fill_mb`` free: mount a small tmpfs there); loss is tc netem,
else nftables dropping that share of the device's packets to the harness's ports; delay is
netem; a link cut must have a duration, since the device brings its link back by itself.
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
               "state_dir", "power_cut_command", "power_on_command", "ssh_options", "start",
               "agent_command", "api_port", "max_fill_mb"}
STARTS = ("systemd", "command")


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
    ssh_options: tuple[str, ...] = ()
    start: str = "systemd"
    agent_command: str = "/opt/edgefleet/bin/edgefleet-agent"
    api_port: int = 8181
    max_fill_mb: int = 1024


@dataclass(frozen=True)
class Inventory:
    devices: list[InventoryDevice]
    harness_address: str | None = None


def parse_inventory(data: dict[str, Any]) -> list[InventoryDevice]:
    return parse_inventory_file(data).devices


def parse_inventory_file(data: dict[str, Any]) -> Inventory:
    unknown = sorted(set(data) - {"harness", "defaults", "devices"})
    if unknown:
        raise ScenarioError(f"inventory: {unknown[0]} is not a known table (harness, defaults, devices)")
    harness = data.get("harness", {})
    if not isinstance(harness, dict) or set(harness) - {"address"}:
        raise ScenarioError("inventory: [harness] has one key, address")
    address = harness.get("address")
    if address is not None and (not isinstance(address, str) or not address):
        raise ScenarioError(f"inventory: harness.address = {address!r} is not an address")
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
        if merged.get("start", "systemd") not in STARTS:
            raise ScenarioError(f"{where}.start = {merged['start']!r}: use {' or '.join(STARTS)}")
        opts = merged.get("ssh_options", [])
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise ScenarioError(f"{where}.ssh_options must be a list of strings")
        merged["ssh_options"] = tuple(opts)
        for key in ("api_port", "max_fill_mb"):
            if key in merged and (not isinstance(merged[key], int) or isinstance(merged[key], bool)
                                  or merged[key] <= 0):
                raise ScenarioError(f"{where}.{key} = {merged[key]!r} must be a positive integer")
        out.append(InventoryDevice(**merged))
    return Inventory(out, address)


def load_inventory(path: Path) -> Inventory:
    try:
        return parse_inventory_file(tomllib.loads(Path(path).read_text()))
    except OSError as exc:
        raise ScenarioError(f"cannot read inventory {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"inventory {path} is not valid TOML: {exc}") from None


class SshCommands:
    """The argv of every remote operation on one device (``ssh`` + a remote shell line).

    ``control_dir``: share one connection per device (OpenSSH ControlMaster) so that the
    harness's frequent state polls cost a round trip, not a handshake."""

    def __init__(self, dev: InventoryDevice, ssh: str = "ssh", control_dir: Path | None = None):
        self.dev = dev
        self.ssh = ssh
        self.control_dir = control_dir

    def _base(self, shared: bool = True) -> list[str]:
        argv = [self.ssh, *self.dev.ssh_options, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-p", str(self.dev.port)]
        if self.dev.identity:
            argv += ["-i", str(Path(self.dev.identity).expanduser())]
        if shared and self.control_dir is not None:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C",
                     "-o", "ControlPersist=120", "-o", "ServerAliveInterval=5"]
        return argv

    def ssh_argv(self, remote: str) -> list[str]:
        return [*self._base(), f"{self.dev.user}@{self.dev.host}", "--", remote]

    def _root(self, line: str) -> list[str]:
        """A shell line run as root: through ``sudo -n`` unless the ssh user is root."""
        if self.dev.user == "root":
            return self.ssh_argv(line)
        return self.ssh_argv("sudo -n sh -c " + shlex.quote(line))

    def _sudo(self, *words: str) -> list[str]:
        if self.dev.user == "root":
            return self.ssh_argv(shlex.join(words))
        return self.ssh_argv("sudo -n " + shlex.join(words))

    # -- the agent ----------------------------------------------------------------------
    @property
    def _pidfile(self) -> str:
        return shlex.quote(self.dev.state_dir.rstrip("/") + ".pid")

    @property
    def logfile(self) -> str:
        return self.dev.state_dir.rstrip("/") + ".log"

    def check(self) -> list[str]:
        return self.ssh_argv("true")

    def close_master(self) -> list[str]:
        return [*self._base(), "-O", "exit", f"{self.dev.user}@{self.dev.host}"]

    def tunnel(self, local_port: int) -> list[str]:
        """Forward 127.0.0.1:local_port here to the agent's API on the device (runs until killed)."""
        return [*self._base(shared=False), "-N", "-o", "ExitOnForwardFailure=yes", "-L",
                f"127.0.0.1:{local_port}:127.0.0.1:{self.dev.api_port}", f"{self.dev.user}@{self.dev.host}"]

    def write_file(self, path: str) -> list[str]:
        """Remote file ``path`` gets this command's stdin (its directory is created)."""
        q = shlex.quote(path)
        return self._root(f"mkdir -p \"$(dirname {q})\" && cat > {q}")

    def reset_state(self) -> list[str]:
        d = shlex.quote(self.dev.state_dir)
        return self._root(f"mkdir -p {d} && find {d} -mindepth 1 -delete")

    def start_agent(self) -> list[str]:
        if self.dev.start == "systemd":
            return self._sudo("systemctl", "restart", self.dev.unit)
        run = f"{self.dev.agent_command} --config {shlex.quote(self.dev.config)} run"
        inner = f"echo $$ > {self._pidfile}; exec {run}"
        p = self._pidfile
        return self._root(f"if [ -s {p} ] && kill -0 -- -$(cat {p}) 2>/dev/null; then echo already running; "
                          f"else setsid sh -c {shlex.quote(inner)} >> {shlex.quote(self.logfile)} 2>&1 "
                          "< /dev/null & fi")

    def _kill_group(self, signal: str) -> str:
        p = self._pidfile
        return f"[ -s {p} ] && kill -{signal} -- -$(cat {p}) 2>/dev/null; true"

    def stop_agent(self) -> list[str]:
        if self.dev.start == "systemd":
            return self._sudo("systemctl", "stop", self.dev.unit)
        p = self._pidfile
        return self._root(f"{self._kill_group('TERM')}; i=0; while [ -s {p} ] && kill -0 -- -$(cat {p}) "
                          f"2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
                          f"{self._kill_group('KILL')}; rm -f {p}")

    def power_cut(self) -> list[str]:
        if self.dev.power_cut_command:
            return shlex.split(self.dev.power_cut_command)
        if self.dev.start == "command":
            return self._root(self._kill_group("KILL"))
        return self._sudo("systemctl", "kill", "--signal=SIGKILL", self.dev.unit)

    def power_on(self) -> list[str]:
        if self.dev.power_on_command:
            return shlex.split(self.dev.power_on_command)
        if self.dev.start == "command":
            return self.start_agent()
        return self._sudo("systemctl", "restart", self.dev.unit)

    def alive_line(self) -> str:
        """A shell line that prints ``up`` or ``down``."""
        if self.dev.start == "systemd":
            return f"systemctl is-active --quiet {shlex.quote(self.dev.unit)} && echo up || echo down"
        p = self._pidfile
        return f"[ -s {p} ] && kill -0 -- -$(cat {p}) 2>/dev/null && echo up || echo down"

    def poll(self, model: str) -> list[str]:
        """The model's state file, a line ``@@``, then ``up`` or ``down``."""
        f = shlex.quote(f"{self.dev.state_dir.rstrip('/')}/models/{model}.json")
        return self._root(f"cat {f} 2>/dev/null; echo; echo @@; {self.alive_line()}")

    def status(self) -> list[str]:
        return self._root(f"{self.dev.agent_command} --config {shlex.quote(self.dev.config)} status --json")

    def spool_listing(self) -> list[str]:
        """The telemetry spool's cursor.json, a line ``@@``, then each segment's name and size."""
        d = shlex.quote(f"{self.dev.state_dir.rstrip('/')}/telemetry_spool")
        return self._root(f"cd {d} 2>/dev/null || exit 0; cat cursor.json 2>/dev/null; echo; echo @@; "
                          'for f in *.seg; do [ -e "$f" ] && echo "$f $(stat -c %s "$f")"; done; true')

    def spool_tail(self, segment: int, offset: int) -> list[str]:
        """One spool segment from ``offset`` on, in base64."""
        f = shlex.quote(f"{self.dev.state_dir.rstrip('/')}/telemetry_spool/{segment:016d}.seg")
        return self._root(f"tail -c +{offset + 1} {f} | base64 -w0")

    def logs(self, since_epoch: int, lines: int = 400) -> list[str]:
        if self.dev.start == "systemd":
            return self._sudo("journalctl", "--no-pager", "-o", "short-iso", "-u", self.dev.unit,
                              f"--since=@{since_epoch}")
        return self._root(f"tail -n {lines} {shlex.quote(self.logfile)}")

    # -- faults -------------------------------------------------------------------------
    def loss(self, percent: float, ports: tuple[int, ...] = ()) -> list[str]:
        netem = shlex.join(["tc", "qdisc", "replace", "dev", self.dev.interface, "root", "netem", "loss",
                            f"{percent:g}%"])
        if not ports:
            return self._sudo(*shlex.split(netem))
        ps = ", ".join(str(p) for p in ports)
        n = round(percent)
        rules = (f"table inet hil {{\n  chain in {{ type filter hook input priority 0; tcp sport {{ {ps} }} "
                 f"counter; tcp sport {{ {ps} }} numgen random mod 100 < {n} counter drop; }}\n"
                 f"  chain out {{ type filter hook output priority 0; tcp dport {{ {ps} }} counter; "
                 f"tcp dport {{ {ps} }} numgen random mod 100 < {n} counter drop; }}\n}}")
        return self._root(f"if {netem} 2>/dev/null; then echo 'netem loss {percent:g}%'; else "
                          f"nft delete table inet hil 2>/dev/null; echo {shlex.quote(rules)} | nft -f - && "
                          f"echo 'nftables: drop {n}% of packets to and from ports {ps} (no netem)'; fi")

    def loss_stats(self) -> list[str]:
        """netem's statistics, a line ``@@``, then the nftables loss table with its counters."""
        return self._root(f"tc -s qdisc show dev {shlex.quote(self.dev.interface)}; echo @@; "
                          "nft list table inet hil 2>/dev/null; true")

    def delay(self, ms: float) -> list[str]:
        return self._sudo("tc", "qdisc", "replace", "dev", self.dev.interface, "root", "netem", "delay",
                          f"{ms:g}ms")

    def clear_impairments(self) -> list[str]:
        return self._root(f"tc qdisc del dev {shlex.quote(self.dev.interface)} root 2>/dev/null; "
                          "nft delete table inet hil 2>/dev/null; true")

    def link(self, up: bool) -> list[str]:
        """Link down for ``seconds`` must come back by itself: the SSH session rides on the link."""
        return self._sudo("ip", "link", "set", self.dev.interface, "up" if up else "down")

    def link_down_for(self, seconds: float) -> list[str]:
        iface = shlex.quote(self.dev.interface)
        return self._root(f"nohup setsid sh -c 'ip link set {iface} down; sleep {seconds:g}; "
                          f"ip link set {iface} up' >/dev/null 2>&1 < /dev/null &")

    def fill_disk(self, keep_kb: int = 64) -> list[str]:
        d = shlex.quote(self.dev.state_dir)
        cap = self.dev.max_fill_mb * 1024
        return self._root(
            f"free=$(df -Pk {d} | awk 'NR==2 {{print $4}}'); "
            f'if [ "$free" -gt {cap} ]; then echo "{self.dev.state_dir} has $free KiB free, more than '
            f'max_fill_mb = {self.dev.max_fill_mb}: mount a small tmpfs there" >&2; exit 3; fi; '
            f"fallocate -l $(( (free - {keep_kb}) * 1024 )) {d}/hil-filler && "
            f"echo \"disk filled: $(df -Pk {d} | awk 'NR==2 {{print $4}}') KiB free\"")

    def free_disk(self) -> list[str]:
        return self._sudo("rm", "-f", f"{self.dev.state_dir}/hil-filler")


class SshDevice:
    """Runs SshCommands; every call returns (ok, output) and never raises on a remote failure."""

    def __init__(self, dev: InventoryDevice, timeout: float = 30.0, ssh: str = "ssh",
                 control_dir: Path | None = None):
        self.dev = dev
        self.cmd = SshCommands(dev, ssh=ssh, control_dir=control_dir)
        self.timeout = timeout

    def run(self, argv: list[str], stdin: str | None = None,
            timeout: float | None = None) -> tuple[bool, str]:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, input=stdin,
                               stdin=None if stdin is not None else subprocess.DEVNULL,
                               timeout=timeout or self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        return r.returncode == 0, (r.stdout + r.stderr).strip()
