"""Device identity against the shipped Mosquitto configuration (packaging/mosquitto/
edgefleet-production.conf and edgefleet.acl, paths and ports rewritten), the real fleet over
HTTP and the real agent: a revoke cuts the device off the broker within a second; a rotated
or re-enrolled agent keeps reporting over MQTT without a restart; the fleet's password file
is appended to and Mosquitto keeps the last line of a user.
(Client-id takeover: tests/packaging/test_mosquitto_acl.py, on the same configuration.)"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import paho.mqtt.client as mqtt
import pytest

from agent.config import parse_config
from agent.fleet_client import Credential, FleetClient
from agent.main import Agent
from agent.runtime.host import ModelHost
from agent.telemetry.connection import TlsOptions
from agent.telemetry.reporter import Reporter
from fleet.broker.passwords import BrokerPasswordFile, hash_password
from fleet.settings import Settings
from shared.bundle.keyring import Keyring
from shared.telemetry import topics

from ..conftest import free_port, mosquitto_binary
from ..packaging.test_mosquitto_acl import production_conf
from ..tls_broker import ACL_FILE, make_ca, make_server_cert
from ..waiting import wait_for
from .fleet_support import ADMIN, ENROLL, admin, serve_fleet

REPO = Path(__file__).resolve().parents[2]
FLEET_USER, FLEET_PASSWORD = "edgefleet-fleet", "fleet-" + "p" * 20
NOT_AUTHORISED = 135


@dataclass
class ShippedBroker:
    directory: Path
    ca_file: Path
    passwd: Path  # devices (the fleet writes it)
    device_port: int
    fleet_port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.device_port}"

    @property
    def fleet_url(self) -> str:
        return f"mqtts://localhost:{self.fleet_port}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto")
    d = tmp_path / "broker"
    certs = d / "certs"
    certs.mkdir(parents=True)
    ca_file, ca_key, ca_cert = make_ca(certs, "edgefleet-ca")
    make_server_cert(certs, ca_key, ca_cert)
    passwd = d / "edgefleet.passwd"
    passwd.write_text("")
    passwd.chmod(0o600)
    (d / "edgefleet-services.passwd").write_text(f"{FLEET_USER}:{hash_password(FLEET_PASSWORD)}\n")
    (d / "edgefleet.acl").write_text(ACL_FILE.read_text())
    dport, fport = free_port(), free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(production_conf(
        (REPO / "packaging" / "mosquitto" / "edgefleet-production.conf").read_text(), d, dport, fport))
    log = (d / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            ok = 0
            for port in (dport, fport):
                with socket.socket() as s:
                    ok += s.connect_ex(("127.0.0.1", port)) == 0
            assert proc.poll() is None, (d / "mosquitto.log").read_text()
            return ok == 2
        wait_for(listening, 15, "mosquitto listening")
        yield ShippedBroker(d, ca_file, passwd, dport, fport, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def fleet_settings(tmp_path: Path, keyring: Keyring, broker: ShippedBroker) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token=ADMIN, enrollment_token=ENROLL,
        run_ingester=False, run_controller=False,
        mqtt_url=broker.fleet_url, public_mqtt_url=broker.url,
        mqtt_username=FLEET_USER, mqtt_password=FLEET_PASSWORD, mqtt_ca_file=broker.ca_file,
        mqtt_password_file=broker.passwd, mqtt_reload_command=f"kill -HUP {broker.proc.pid}",
    )


def connack(broker: ShippedBroker, user: str, password: str) -> int:
    """The CONNACK reason code of a device login on the device listener."""
    got: queue.Queue[int] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{user}", protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.tls_set_context(ssl.create_default_context(cafile=str(broker.ca_file)))
    c.on_connect = lambda cl, u, f, rc, p: got.put(rc.value)
    c.connect("127.0.0.1", broker.device_port)
    c.loop_start()
    try:
        return got.get(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


class HealthWatch:
    """The fleet's login on the fleet listener, counting one device's health messages."""

    def __init__(self, broker: ShippedBroker, device_id: str) -> None:
        self.count = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgefleet-test-watch",
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(FLEET_USER, FLEET_PASSWORD)
        self.c.tls_set_context(ssl.create_default_context(cafile=str(broker.ca_file)))
        self.c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topics.topic(device_id, "health"), qos=1)
        self.c.on_message = lambda cl, u, m: setattr(self, "count", self.count + 1)
        self.c.connect("localhost", broker.fleet_port)
        self.c.loop_start()

    def more(self, n: int, what: str, timeout: float = 30.0) -> None:
        start = self.count
        wait_for(lambda: self.count >= start + n, timeout, what)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_revoke_cuts_the_device_off_the_broker_within_a_second(
    broker: ShippedBroker, tmp_path: Path, keyring: Keyring
) -> None:
    with serve_fleet(fleet_settings(tmp_path, keyring, broker)) as url, httpx.Client(base_url=url) as http:
        fc = FleetClient(url=url, device_id="cam-1", enrollment_token=ENROLL, labels={},
                         state_dir=tmp_path / "agent", client=http)
        cred = fc.credential()
        assert cred.broker_password and cred.mqtt_url == broker.url
        rep = Reporter(device_id="cam-1", mqtt_url=broker.url, state_dir=tmp_path / "agent", host=ModelHost(),
                       health_interval_s=3600, username="cam-1", password=cred.broker_password,
                       tls=TlsOptions(ca_file=broker.ca_file))
        rep.start()
        try:
            wait_for(rep.connected.is_set, 20, f"the device's MQTT connection ({rep.last_error})")
            started = time.monotonic()
            r = http.post("/api/v1/devices/cam-1/revoke", headers=admin())
            assert r.status_code == 200 and r.json()["status"] == "revoked"
            wait_for(lambda: not rep.connected.is_set(), 5, "the broker to end the session")
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"cut off after {elapsed:.2f} s"
            # ... and it stays out: its broker password and its API credential are dead
            assert connack(broker, "cam-1", cred.broker_password) == NOT_AUTHORISED
            assert http.get("/api/v1/devices/cam-1/desired", headers=fc.auth_headers()).status_code == 401
            time.sleep(1.5)  # paho's reconnect attempts are refused too
            assert not rep.connected.is_set()
        finally:
            rep.stop()
    # the password file was appended to, never rewritten: one line per change
    lines = broker.passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["cam-1", "cam-1"]
    assert BrokerPasswordFile(broker.passwd).entries()["cam-1"] == lines[-1].split(":", 1)[1]


def _credential(state_dir: Path) -> Credential:
    return msgspec.json.decode((state_dir / "device.json").read_bytes(), type=Credential)


def test_rotated_and_reenrolled_agent_keeps_reporting_without_restart(
    broker: ShippedBroker, tmp_path: Path, keyring: Keyring
) -> None:
    state = tmp_path / "agent"
    with serve_fleet(fleet_settings(tmp_path, keyring, broker)) as url, httpx.Client(base_url=url) as http:
        config = parse_config({
            "device_id": "cam-1", "state_dir": str(state), "trust_root": str(keyring.root_path),
            "api": {"listen": "127.0.0.1:0"},
            "fleet": {"url": url, "enrollment_token": ENROLL, "poll_interval_s": 0.3},
            "mqtt": {"ca_file": str(broker.ca_file), "health_interval_s": 0.3},
        })
        watch = HealthWatch(broker, "cam-1")
        agent = Agent(config)
        agent.start()
        try:
            watch.more(2, "the agent's health over MQTT")
            first = _credential(state)
            # the operator rotates: the agent fetches new credentials on its next pull and its
            # MQTT login follows, without a restart
            assert http.post("/api/v1/devices/cam-1/rotate", headers=admin()).status_code == 200
            rotated = wait_for(lambda: (c := _credential(state)).broker_password != first.broker_password
                               and c, 20, "the agent to rotate its credentials")
            assert rotated.credential != first.credential
            watch.more(3, "health after the rotation")
            assert agent.reporter is not None and agent.reporter.password == rotated.broker_password
            assert connack(broker, "cam-1", first.broker_password or "") == NOT_AUTHORISED
            device = http.get("/api/v1/devices/cam-1", headers=admin()).json()
            assert device["rotation_requested_at"] is None and device["status"] == "active"
            # re-enrollment (with its credential as proof): the same, MQTT moves at once
            assert agent.fleet is not None
            again = agent.fleet.enroll()
            assert again.broker_password != rotated.broker_password
            watch.more(3, "health after the re-enrollment")
            assert agent.reporter.password == again.broker_password
            assert agent.reporter.connected.is_set()
        finally:
            agent.stop()
            watch.close()


def test_fleet_wide_rotation_with_real_agent_processes_darkens_no_device(
    broker: ShippedBroker, tmp_path: Path, keyring: Keyring
) -> None:
    """Two agent processes; `rotate --all`: each fetches new credentials on its next pull and
    keeps reporting over MQTT with them, no restart; every old broker password is refused."""
    devices = ("cam-a", "cam-b")
    procs: list[subprocess.Popen[bytes]] = []
    with serve_fleet(fleet_settings(tmp_path, keyring, broker)) as url, httpx.Client(base_url=url) as http:
        watches = {d: HealthWatch(broker, d) for d in devices}
        try:
            for d in devices:
                state = tmp_path / d
                cfg = tmp_path / f"{d}.toml"
                cfg.write_text(
                    f'device_id = "{d}"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
                    f'[fleet]\nurl = "{url}"\nenrollment_token = "{ENROLL}"\npoll_interval_s = 0.5\n'
                    f'[mqtt]\nhealth_interval_s = 0.3\nca_file = "{broker.ca_file}"\n'
                    '[api]\nlisten = "127.0.0.1:0"\n')
                with open(tmp_path / f"{d}.log", "ab") as fh:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO,
                        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=fh, stderr=subprocess.STDOUT))
            for d in devices:
                watches[d].more(2, f"{d}'s health; log: {(tmp_path / f'{d}.log').read_text()[-1500:]}")
            before = {d: _credential(tmp_path / d) for d in devices}
            r = http.post("/api/v1/devices/rotate", headers=admin())
            assert r.status_code == 200 and r.json() == {"requested": 2}
            for d in devices:
                wait_for(lambda d=d: _credential(tmp_path / d).broker_password != before[d].broker_password,
                         20, f"{d} to rotate")
                watches[d].more(3, f"{d}'s health after the rotation")
                assert connack(broker, d, before[d].broker_password or "") == NOT_AUTHORISED
                assert connack(broker, d, _credential(tmp_path / d).broker_password or "") == 0
            assert all(p.poll() is None for p in procs)  # never restarted
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            for w in watches.values():
                w.close()


def test_agent_whose_broker_password_was_reset_fetches_new_credentials(
    broker: ShippedBroker, tmp_path: Path, keyring: Keyring
) -> None:
    """The broker refuses the agent's login (its line in the password file was replaced, e.g.
    restored from an old backup): the agent asks the fleet for new credentials with its API
    credential and reports again, without a restart."""
    state = tmp_path / "agent"
    with serve_fleet(fleet_settings(tmp_path, keyring, broker)) as url:
        config = parse_config({
            "device_id": "cam-1", "state_dir": str(state), "trust_root": str(keyring.root_path),
            "api": {"listen": "127.0.0.1:0"},
            "fleet": {"url": url, "enrollment_token": ENROLL, "poll_interval_s": 60},
            "mqtt": {"ca_file": str(broker.ca_file), "health_interval_s": 0.3},
        })
        watch = HealthWatch(broker, "cam-1")
        agent = Agent(config)
        agent.start()
        try:
            watch.more(2, "the agent's health over MQTT")
            before = _credential(state)
            BrokerPasswordFile(broker.passwd, f"kill -HUP {broker.proc.pid}").set("cam-1", "not-the-agents")
            healed = wait_for(lambda: (c := _credential(state)).broker_password != before.broker_password
                              and c, 20, "the agent to fetch new credentials")
            watch.more(3, "health after the agent healed its login")
            assert agent.reporter is not None and agent.reporter.password == healed.broker_password
        finally:
            agent.stop()
            watch.close()
