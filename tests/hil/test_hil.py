"""The HIL harness: scenario and inventory parsing and SSH command building. Every scenario runs
for real in tests/hil/every_scenario.py (`make hil-ci`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hil.scenario import ScenarioError, load_scenario, parse_scenario, resolve_devices
from hil.ssh import InventoryDevice, SshCommands, parse_inventory

SCENARIOS = Path(__file__).resolve().parents[2] / "hil" / "scenarios"


def test_every_bundled_scenario_parses() -> None:
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"bad-canary-under-loss", "power-cuts", "broker-outage", "full-disk", "late-device"} <= names
    for path in SCENARIOS.glob("*.toml"):
        sc = load_scenario(path)
        assert sc.faults and sc.expect.rollout, path
        # a loaded machine must not turn a short sample into a pause: every scenario waits for it
        assert sc.rollout["on_inconclusive"] == "extend" and sc.rollout["max_extensions"] >= 1, path
        for fault in sc.faults:
            if not fault.action.startswith("broker"):
                assert resolve_devices(fault.devices, sc.device_ids(), sc.canary)


@pytest.mark.parametrize("data, message", [
    ({"devices": 0}, "between 1 and 64"),
    ({"release": "shiny"}, "healthy or faulty"),
    ({"faults": [{"action": "meteor"}]}, "action = 'meteor'"),
    ({"faults": [{"action": "loss", "devices": "most"}]}, "devices = 'most'"),
    ({"faults": [{"action": "power_cut", "when_state": "dancing"}]}, "when_state = 'dancing'"),
    ({"faults": [{"action": "loss", "percent": 3}]}, "percent is not a fault key"),
    ({"expect": {"serving": "maybe"}}, "expect.serving"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"rollout": {"stages": [{"name": "all"}], "bake": 3}}, "rollout.bake is not a rollout key"),
])
def test_bad_scenarios_are_refused_with_the_key(data: dict, message: str) -> None:
    with pytest.raises(ScenarioError, match=message.replace("(", r"\(").replace("'", "'")):
        parse_scenario(data)


def test_half_and_named_devices() -> None:
    ids = ["dev-01", "dev-02", "dev-03", "dev-04"]
    assert resolve_devices("half", ids, ()) == ["dev-01", "dev-02"]
    assert resolve_devices("last", ids, ()) == ["dev-04"]
    assert resolve_devices("canary", ids, ("dev-02",)) == ["dev-02"]
    with pytest.raises(ScenarioError, match="unknown devices"):
        resolve_devices(("dev-09",), ids, ())


def test_inventory_parsing_merges_defaults_and_refuses_mistakes() -> None:
    devices = parse_inventory({
        "defaults": {"user": "pi", "identity": "~/.ssh/hil", "interface": "wlan0"},
        "devices": [{"id": "cam-01", "host": "10.0.4.21", "labels": {"ring": "canary"}},
                    {"id": "cam-02", "host": "cam-02.lab", "user": "admin", "port": 2222}],
    })
    assert devices[0] == InventoryDevice(id="cam-01", host="10.0.4.21", user="pi", identity="~/.ssh/hil",
                                         interface="wlan0", labels={"ring": "canary"})
    assert (devices[1].user, devices[1].port) == ("admin", 2222)
    one = [{"id": "a", "host": "h"}]
    cases = [
        ({"devices": []}, "no \\[\\[devices\\]\\]"),
        ({"devices": [{"id": "a"}]}, "host is required"),
        ({"devices": [{"id": "a", "host": "h", "port": 0}]}, "is not a port"),
        ({"devices": [*one, {"id": "a", "host": "g"}]}, "appears twice"),
        ({"devices": [{"id": "a", "host": "h", "pasword": "x"}]}, "pasword is not a known key"),
        ({"defaults": {"hostt": "x"}, "devices": one}, "defaults.hostt"),
    ]
    for bad, message in cases:
        with pytest.raises(ScenarioError, match=message):
            parse_inventory(bad)


def test_ssh_commands() -> None:
    dev = InventoryDevice(id="cam-01", host="10.0.4.21", user="pi", port=2222, identity="/k/id",
                          interface="eth0", state_dir="/var/lib/edgefleet")
    c = SshCommands(dev)
    prefix = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "2222", "-i", "/k/id",
              "pi@10.0.4.21", "--"]
    assert c.start_agent() == [*prefix, "sudo -n systemctl restart edgefleet-agent.service"]
    assert c.stop_agent() == [*prefix, "sudo -n systemctl stop edgefleet-agent.service"]
    assert c.power_cut() == [*prefix, "sudo -n systemctl kill --signal=SIGKILL edgefleet-agent.service"]
    assert c.status() == [*prefix, "sudo -n sh -c '/opt/edgefleet/bin/edgefleet-agent --config "
                                   "/etc/edgefleet/agent.toml status --json'"]
    assert c.loss(20) == [*prefix, "sudo -n tc qdisc replace dev eth0 root netem loss 20%"]
    nft = c.loss(20, (8000, 1883))[-1]  # netem, else nftables on the harness's ports
    assert "nft -f -" in nft and "tcp dport { 8000, 1883 }" in nft
    assert nft.count("counter drop") == 2 and nft.count("counter;") == 2  # what it saw, what it dropped
    stats = c.loss_stats()[-1]
    assert stats == ("sudo -n sh -c 'tc -s qdisc show dev eth0; echo @@; "
                     "nft list table inet hil 2>/dev/null; true'")
    assert c.delay(150.5) == [*prefix, "sudo -n tc qdisc replace dev eth0 root netem delay 150.5ms"]
    assert c.clear_impairments()[-1].startswith("sudo -n sh -c 'tc qdisc del dev eth0 root")
    assert "ip link set eth0 down; sleep 5;" in c.link_down_for(5)[-1]
    assert "fallocate" in c.fill_disk()[-1] and "/var/lib/edgefleet/hil-filler" in c.fill_disk()[-1]
    assert c.free_disk()[-1] == "sudo -n rm -f /var/lib/edgefleet/hil-filler"
    assert "max_fill_mb = 1024: mount a small tmpfs" in c.fill_disk()[-1]
    # start = "command": the agent in its own process group, killed as a group; root needs no sudo
    cmd = SshCommands(InventoryDevice(id="x", host="h", start="command", state_dir="/s",
                                      agent_command="/a/edgefleet-agent", config="/c.toml"))
    assert cmd.start_agent()[-1].endswith("then echo already running; else setsid sh -c 'echo $$ > /s.pid; "
                                          "exec /a/edgefleet-agent --config /c.toml run' >> /s.log 2>&1 "
                                          "< /dev/null & fi")
    assert cmd.power_cut()[-1] == "[ -s /s.pid ] && kill -KILL -- -$(cat /s.pid) 2>/dev/null; true"
    assert cmd.status()[-1] == "/a/edgefleet-agent --config /c.toml status --json"
    # a relay hook replaces the systemctl power cut
    relay = SshCommands(InventoryDevice(id="x", host="h", power_cut_command="relay-ctl off 3",
                                        power_on_command="relay-ctl on 3"))
    assert relay.power_cut() == ["relay-ctl", "off", "3"] and relay.power_on() == ["relay-ctl", "on", "3"]
    # hostile values are quoted, never interpreted by the remote shell
    odd = SshCommands(InventoryDevice(id="x", host="h", user="pi", interface="eth0; reboot"))
    assert odd.loss(1)[-1] == "sudo -n tc qdisc replace dev 'eth0; reboot' root netem loss 1%"


def test_cli_refuses_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('devices = "many"\n')
    r = subprocess.run([sys.executable, "-m", "hil", "run", str(bad), "--report", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=SCENARIOS.parents[1])
    assert r.returncode == 2 and "devices = 'many' has the wrong type" in r.stderr
