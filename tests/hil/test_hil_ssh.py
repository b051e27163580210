"""``--mode ssh`` for real: each "device" is a network namespace on the HIL bridge running a
real OpenSSH server (key-only, keys made here); the harness reaches it over SSH, writes the
agent's config, starts the agent there, injects faults through SshCommands and reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.demo.processes import ManagedProcess, wait_until
from hil.lab import GATEWAY, NetLab, probe
from hil.remote import SshRun, map_scenario
from hil.scenario import parse_scenario
from hil.ssh import parse_inventory_file

SSHD = "/usr/sbin/sshd"
AGENT = str(Path(sys.executable).parent / "edgefleet-agent")
SCENARIO = {  # bad-canary-under-loss on two devices, plus a power cut of the second one and a broker outage
    "name": "bad canary under loss over ssh", "devices": 2, "canary": ["dev-01"], "release": "faulty",
    "timeout_s": 60,
    "rollout": {"stages": [{"name": "canary", "selector": {"ring": "canary"}, "min_devices": 1,
                            "bake_seconds": 3},
                           {"name": "all", "percent": 100, "bake_seconds": 2}],
                "gates": {"max_error_rate": 0.05, "min_inferences": 30, "max_install_failures": 0},
                "on_inconclusive": "extend", "extend_seconds": 5, "max_extensions": 8},
    "faults": [{"action": "loss", "devices": "all", "value": 20, "at_s": 0},
               {"action": "power_cut", "devices": ["dev-02"], "at_s": 0.5, "duration_s": 2},
               {"action": "broker_stop", "at_s": 1.0, "duration_s": 4}],
    "expect": {"rollout": ["rolled_back"], "serving": "healthy", "views_match": True},
}


def test_scenario_devices_map_onto_the_inventory_in_order() -> None:
    sc = parse_scenario(SCENARIO)
    mapped, dropped = map_scenario(sc, ["cam-a", "cam-b", "cam-c"], ["cam-a", "cam-c"])
    assert mapped.device_ids() == ["cam-a", "cam-c"] and mapped.canary == ("cam-a",)
    assert [f.action for f in mapped.faults] == ["loss", "broker_stop"]
    assert dropped == ["power_cut cam-b: unreachable"]


def test_unreachable_devices_and_missing_ssh_are_reported_not_raised(tmp_path: Path) -> None:
    inv = parse_inventory_file({"harness": {"address": "127.0.0.1"}, "devices": [
        {"id": "gone", "host": "127.0.0.1", "port": _closed_port(), "ssh_options": ["-F", "none"]}]})
    sc = parse_scenario(SCENARIO)
    report = SshRun(sc, tmp_path / "r1", inv, narrate=lambda _: None).run()
    assert report["verdict"] == "fail" and "no device of the inventory is reachable" in report["error"]
    assert "gone" in report["unreachable"] and "refused" in report["unreachable"]["gone"].lower()
    assert "## Unreachable devices" in (tmp_path / "r1" / "report.md").read_text()
    report = SshRun(sc, tmp_path / "r2", inv, ssh="/nonexistent/ssh", narrate=lambda _: None).run()
    assert "openssh-client" in report["error"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on return: connections are refused


@pytest.fixture
def ssh_lab(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """Two namespaces with sshd on 10.213.0.11 and .12; the inventory that reaches them."""
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("mosquitto")
                 or "/usr/sbin/mosquitto"):
        if not tool or not os.access(tool, os.X_OK):
            pytest.skip(f"{tool or 'ssh'} missing: make deps-system (Debian packages openssh-server, "
                        "openssh-client, mosquitto)")
    caps = probe()
    if not caps.netns or not (caps.netem or caps.nft):
        pytest.skip(f"needs root with network namespaces and netem or nftables: {caps.reasons}")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("client", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    host_pub = (keys / "host.pub").read_text().split()[:2]
    net = NetLab(caps, ())
    procs: list[ManagedProcess] = []
    try:
        net.setup_bridge()
        devices = []
        for i, name in enumerate(("cam-a", "cam-b"), start=1):
            addr = net.add_device(name, i)
            conf = tmp_path / f"sshd-{name}.conf"
            conf.write_text(f"ListenAddress {addr}\nPort 22\nHostKey {keys / 'host'}\n"
                            f"AuthorizedKeysFile {keys / 'client.pub'}\nPermitRootLogin prohibit-password\n"
                            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                            "StrictModes no\nPidFile none\nAllowTcpForwarding yes\nMaxSessions 50\n"
                            "MaxStartups 50\nLogLevel VERBOSE\n")
            procs.append(ManagedProcess(f"sshd-{name}", net.wrap(name, [SSHD, "-D", "-e", "-f", str(conf)]),
                                        tmp_path / f"sshd-{name}.log").start())
            devices.append((name, addr))
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"{addr} {' '.join(host_pub)}\n" for _, addr in devices))
        inventory = tmp_path / "inventory.toml"
        opts = ["-F", "none", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
        lines = [f'[harness]\naddress = "{GATEWAY}"\n[defaults]\nuser = "root"\n'
                 f'identity = "{keys / "client"}"\nssh_options = {json.dumps(opts)}\ninterface = "hild"\n'
                 f'start = "command"\nagent_command = "{AGENT}"\n']
        for name, addr in devices:
            d = tmp_path / "device" / name
            lines.append(f'[[devices]]\nid = "{name}"\nhost = "{addr}"\nconfig = "{d}/agent.toml"\n'
                         f'state_dir = "{d}/state"\n')
        inventory.write_text("".join(lines))
        for _, addr in devices:
            wait_until(lambda a=addr: subprocess.run(
                ["ssh", *opts, "-o", "BatchMode=yes", "-i", str(keys / "client"), f"root@{a}", "true"],
                capture_output=True, timeout=20).returncode == 0, timeout=30, interval=0.3,
                what=f"sshd at {addr}")
        yield inventory, [p.tail() for p in procs]
    finally:
        for p in procs:
            p.stop()
        net.close()


@pytest.mark.long
@pytest.mark.e2e
def test_bad_canary_over_ssh_for_real(ssh_lab: tuple[Path, list[str]], tmp_path: Path) -> None:
    inventory, _ = ssh_lab
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "hil", "run", "--mode", "ssh", "--inventory", str(inventory),
                        "--report", str(out), "/dev/stdin"], input=_toml(SCENARIO), capture_output=True,
                       text=True, timeout=240, cwd=Path(__file__).resolve().parents[2])
    report = json.loads((out / "report.json").read_text())
    assert r.returncode == 0 and report["verdict"] == "pass", (
        json.dumps(report["checks"], indent=1) + r.stdout + r.stderr)
    assert report["mode"] == "ssh" and report["device_map"] == {"dev-01": "cam-a", "dev-02": "cam-b"}
    assert report["rollout"]["state"] == "rolled_back" and report["skipped"] == []
    for device in ("cam-a", "cam-b"):
        d = report["devices"][device]
        views = d["views"]
        assert d["views_match"] and views["agent_status"] == d["final_release"] == views["fleet_reported"]
        assert d["polls"] > 10 and Path(d["log"]).read_text().strip()
    # the canary installed the faulty release over ssh and rolled back; the cut device came back
    assert {"trial"} & {e.get("state") for e in report["devices"]["cam-a"]["events"]} or any(
        e.get("active_release") == 2 for e in report["devices"]["cam-a"]["events"])
    cut = [f for f in report["faults"] if f["action"] in ("power_cut", "power_on")]
    assert [f["action"] for f in cut] == ["power_cut", "power_on"] and all("result" in f for f in cut)
    loss = [f for f in report["faults"] if f["action"] == "loss"]
    assert len(loss) == 2 and all("loss" in f["result"] or "drop 20%" in f["result"] for f in loss)
    md = (out / "report.md").read_text()
    assert "mode: **ssh**" in md and "agent status (ssh)" in md
    # every fault proved over ssh: the loss counters, the state file at the cut, the spools
    fired = {c["check"]: c for c in report["checks"] if c["check"].startswith("fault fired")}
    assert sorted(fired) == ["fault fired: broker_stop", "fault fired: loss cam-a", "fault fired: loss cam-b",
                             "fault fired: power_cut cam-b"], fired
    assert "nftables" in fired["fault fired: loss cam-a"]["detail"]
    assert "state file at the cut" in fired["fault fired: power_cut cam-b"]["detail"]
    assert "records spooled while the broker was down" in fired["fault fired: broker_stop"]["detail"]


def _toml(data: dict) -> str:
    """Just enough TOML for SCENARIO (python has no TOML writer)."""
    def val(v: object) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(v)
    lines = [f"{k} = {val(v)}" for k, v in data.items() if k not in ("rollout", "faults", "expect")]
    lines += ["[rollout]"] + [f"{k} = {val(v)}" for k, v in data["rollout"].items()]
    for f in data["faults"]:
        lines += ["[[faults]]"] + [f"{k} = {val(v)}" for k, v in f.items()]
    lines += ["[expect]"] + [f"{k} = {val(v)}" for k, v in data["expect"].items()]
    return "\n".join(lines) + "\n"
