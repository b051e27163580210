"""The emulated lab: a bridge in the root namespace, one network namespace per device
joined to it by a veth pair, link impairments, tmpfs disks, and a Mosquitto to stop and
start. Every method returns what it did or raises LabError; ``available()`` says which
mechanisms this machine has, so the report can name what was skipped and why.

    root ns: bridge hil0 10.213.0.1/24 (fleet, broker and the local apps' side)
      veth hilh-dev-01 <-> hild (in netns hil-dev-01, 10.213.0.11/24)
Loss uses netem when the kernel has it, else nftables (numgen random), limited to the
device's traffic with the fleet and the broker. Delay needs netem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hil.evidence import parse_netem_stats, parse_nft_counters

BRIDGE = "hil0"
SUBNET = "10.213.0"
GATEWAY = f"{SUBNET}.1"


class LabError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


@dataclass
class Capabilities:
    netns: bool = False
    netem: bool = False
    nft: bool = False
    tmpfs: bool = False
    reasons: dict[str, str] = field(default_factory=dict)

    def loss_mechanism(self) -> str | None:
        return "netem" if self.netem else "nftables" if self.nft else None


def probe() -> Capabilities:
    """What this machine allows: namespaces, netem, nftables, tmpfs mounts."""
    caps = Capabilities()
    ip = shutil.which("ip")
    if os.geteuid() != 0:
        caps.reasons["netns"] = caps.reasons["tmpfs"] = "not root"
    elif ip is None:
        caps.reasons["netns"] = "ip not installed (Debian package iproute2)"
    else:
        name = f"hilprobe{os.getpid()}"
        r = _run("ip", "netns", "add", name, check=False)
        if r.returncode == 0:
            caps.netns = True
            tc = shutil.which("tc")
            if tc:
                _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up", check=False)
                r2 = _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                          "delay", "1ms", check=False)
                caps.netem = r2.returncode == 0
                if not caps.netem:
                    caps.reasons["netem"] = (f"tc netem refused: {r2.stderr.strip()} "
                                             "(kernel without sch_netem)")
            else:
                caps.reasons["netem"] = "tc not installed (Debian package iproute2)"
            if shutil.which("nft"):
                r3 = _run("ip", "netns", "exec", name, "nft", "add", "table", "inet", "probe", check=False)
                caps.nft = r3.returncode == 0
                if not caps.nft:
                    caps.reasons["nft"] = f"nft refused: {r3.stderr.strip()}"
            else:
                caps.reasons["nft"] = "nft not installed (Debian package nftables)"
            _run("ip", "netns", "del", name, check=False)
        else:
            caps.reasons["netns"] = f"ip netns add refused: {r.stderr.strip()}"
    if os.geteuid() == 0:
        probe_dir = Path(f"/tmp/hil-tmpfs-probe-{os.getpid()}")
        probe_dir.mkdir(exist_ok=True)
        r = _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe_dir), check=False)
        caps.tmpfs = r.returncode == 0
        if caps.tmpfs:
            _run("umount", str(probe_dir), check=False)
        else:
            caps.reasons["tmpfs"] = f"mount -t tmpfs refused: {r.stderr.strip()}"
        with contextlib.suppress(OSError):
            probe_dir.rmdir()
    if not caps.netns:
        for key in ("netem", "nft"):
            caps.reasons.setdefault(key, "no network namespaces")
    return caps


class NetLab:
    """Bridge, namespaces and veth pairs; ``close()`` removes all of them."""

    def __init__(self, caps: Capabilities, ports: tuple[int, ...]):
        self.caps = caps
        self.ports = ports  # fleet and broker ports: what loss applies to
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self.host_if: dict[str, str] = {}
        self._created_bridge = False

    def setup_bridge(self) -> None:
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            raise LabError(f"bridge {BRIDGE} exists: another HIL run, or a leftover (ip link del {BRIDGE})")
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._created_bridge = True
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")

    def add_device(self, device: str, index: int) -> str:
        ns = f"hil-{device}"
        host_if = f"hilh{index}"
        _run("ip", "netns", "add", ns)
        self.ns[device] = ns
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "hild", "netns", ns)
        self.host_if[device] = host_if
        _run("ip", "link", "set", host_if, "master", BRIDGE)
        _run("ip", "link", "set", host_if, "up")
        addr = f"{SUBNET}.{10 + index}"
        self.addr[device] = addr
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "hild")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "hild", "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return addr

    def wrap(self, device: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[device], *argv]

    # -- impairments ------------------------------------------------------------------
    def link(self, device: str, up: bool) -> str:
        _run("ip", "link", "set", self.host_if[device], "up" if up else "down")
        return f"link {'up' if up else 'down'} ({self.host_if[device]})"

    def loss(self, device: str, percent: float) -> str:
        ns = self.ns[device]
        if self.caps.netem:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "hild", "root", "netem",
                 "loss", f"{percent}%")
            return f"netem loss {percent}% on all of the device's traffic"
        if self.caps.nft:
            self.loss_clear(device)
            ports = ", ".join(str(p) for p in self.ports)
            n = round(percent)
            rules = (
                "table inet hil {\n"
                f"  chain in {{ type filter hook input priority 0; tcp sport {{ {ports} }} counter; "
                f"tcp sport {{ {ports} }} numgen random mod 100 < {n} counter drop; }}\n"
                f"  chain out {{ type filter hook output priority 0; tcp dport {{ {ports} }} counter; "
                f"tcp dport {{ {ports} }} numgen random mod 100 < {n} counter drop; }}\n"
                "}\n"
            )
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                           capture_output=True)
            return f"nftables: drop {n}% of packets to and from the fleet and the broker (ports {ports})"
        raise LabError("loss needs tc netem or nftables: " + (self.caps.reasons.get("nft") or ""))

    def loss_stats(self, device: str) -> dict[str, object]:
        """What the loss in effect did so far: packets it saw and packets it dropped."""
        ns = self.ns[device]
        if self.caps.netem:
            text = _run("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", "hild").stdout
            seen, dropped = parse_netem_stats(text)
            return {"mechanism": "netem", "packets": seen, "dropped": dropped}
        text = _run("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "hil").stdout
        seen, dropped = parse_nft_counters(text)
        return {"mechanism": "nftables", "packets": seen, "dropped": dropped}

    def loss_clear(self, device: str) -> str:
        ns = self.ns[device]
        if self.caps.netem:
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "hild", "root", check=False)
        if self.caps.nft:
            _run("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "hil", check=False)
        return "loss cleared"

    def delay(self, device: str, ms: float) -> str:
        if not self.caps.netem:
            raise LabError(f"delay needs tc netem: {self.caps.reasons.get('netem', '')}")
        _run("ip", "netns", "exec", self.ns[device], "tc", "qdisc", "replace", "dev", "hild", "root",
             "netem", "delay", f"{ms}ms")
        return f"netem delay {ms} ms"

    def close(self) -> None:
        for device, ns in self.ns.items():
            with contextlib.suppress(LabError):
                _run("ip", "link", "del", self.host_if[device], check=False)
            _run("ip", "netns", "del", ns, check=False)
        if self._created_bridge:
            _run("ip", "link", "del", BRIDGE, check=False)


class TmpfsDisk:
    """A small tmpfs as a device's state_dir; ``fill()`` leaves ``keep_kb`` free."""

    def __init__(self, path: Path, size_mb: int):
        self.path = path
        self.size_mb = size_mb
        path.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path))

    def fill(self, keep_kb: int = 64) -> str:
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        size = max(0, free - keep_kb * 1024)
        with open(self.path / "hil-filler", "wb") as fh:
            fh.truncate(0)
            chunk = b"\0" * (1 << 20)
            left = size
            with contextlib.suppress(OSError):
                while left > 0:
                    left -= fh.write(chunk[: min(len(chunk), left)])
        st = os.statvfs(self.path)
        return f"disk filled: {st.f_bavail * st.f_frsize // 1024} KiB free of {self.size_mb} MiB"

    def close(self) -> None:
        _run("umount", "-l", str(self.path), check=False)


class MosquittoBroker:
    """A real Mosquitto the harness can stop (an outage) and start again on the same port."""

    def __init__(self, workdir: Path, bind: str = "0.0.0.0", port: int = 0):
        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
        if self.binary is None:
            raise LabError("mosquitto is not installed (Debian package mosquitto)")
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {port} {bind}\nallow_anonymous true\npersistence false\n"
                             "max_queued_messages 10000\nuser root\n")
        self.log = workdir / "logs" / "mosquitto.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=fh,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return f"broker started on {self.port}"
            time.sleep(0.05)
        raise LabError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> str:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        return "broker stopped"
