"""The production Mosquitto configuration, run for real: TLS, passwords, per-device ACLs.

packaging/mosquitto/edgefleet-production.conf and edgefleet.acl are used as shipped; only
paths, ports and logging are rewritten for a temporary directory.
"""

from __future__ import annotations

import queue
import re
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from .conftest import PACKAGING, tool

PASSWORDS = {"dev-a": "pw-a", "dev-b": "pw-b", "edgefleet-fleet": "pw-fleet", "edgefleet-reader": "pw-r"}
SERVICES = ("edgefleet-fleet", "edgefleet-reader")  # the fleet listener's own password file
TOPIC = "edgefleet/v1/devices/{}/{}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsBroker:
    device_port: int
    fleet_port: int
    ca: Path
    proc: subprocess.Popen[bytes]
    log: Path


def production_conf(src: str, tmp: Path, device_port: int, fleet_port: int) -> str:
    """The shipped config with this test's paths and ports (and no syslog, no persistence)."""
    text = src.replace("/etc/mosquitto/certs/", f"{tmp}/certs/")
    text = text.replace("/etc/mosquitto/edgefleet.passwd", f"{tmp}/edgefleet.passwd")
    text = text.replace("/etc/mosquitto/edgefleet-services.passwd", f"{tmp}/edgefleet-services.passwd")
    text = text.replace("/etc/mosquitto/edgefleet.acl", f"{tmp}/edgefleet.acl")
    text = text.replace("listener 8883\n", f"listener {device_port} 127.0.0.1\n")
    text = text.replace("listener 8884\n", f"listener {fleet_port} 127.0.0.1\n")
    text = re.sub(r"^persistence true$", "persistence false", text, flags=re.M)
    text = re.sub(r"^(persistence_location|autosave_interval|log_dest) .*$", "", text, flags=re.M)
    assert f"listener {device_port}" in text and f"listener {fleet_port}" in text
    # Started as root, Mosquitto would switch to the user 'mosquitto', who cannot read tmp files.
    return text + "log_dest stderr\nlog_type all\nuser root\n"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    tmp_path = tmp_path_factory.mktemp("mosquitto")
    mosquitto = tool("mosquitto", "mosquitto")
    passwd = tool("mosquitto_passwd", "mosquitto")
    tool("openssl", "openssl")
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(PACKAGING / "mosquitto" / "gen-certs.sh"), str(certs), "localhost",
                    "IP:127.0.0.1"], check=True, capture_output=True)
    for user, password in PASSWORDS.items():
        pwfile = tmp_path / ("edgefleet-services.passwd" if user in SERVICES else "edgefleet.passwd")
        subprocess.run([passwd, *([] if pwfile.exists() else ["-c"]), "-b", str(pwfile), user, password],
                       check=True, capture_output=True)
    (tmp_path / "edgefleet.acl").write_text((PACKAGING / "mosquitto" / "edgefleet.acl").read_text())
    dport, fport = _free_port(), _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(production_conf(
        (PACKAGING / "mosquitto" / "edgefleet-production.conf").read_text(), tmp_path, dport, fport))
    log = tmp_path / "mosquitto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            ready = 0
            for port in (dport, fport):
                with socket.socket() as s:
                    ready += s.connect_ex(("127.0.0.1", port)) == 0
            if ready == 2:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not start: {log.read_text()}")
            time.sleep(0.05)
        yield TlsBroker(dport, fport, certs / "edgefleet-ca.crt", proc, log)
    finally:
        proc.terminate()
        proc.wait(10)


class Client:
    """A paho client that records what it receives and the result of each subscribe."""

    def __init__(self, broker: TlsBroker, user: str, password: str | None = None, *,
                 port: int | None = None, client_id: str | None = None, tls: bool = True):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"{user}-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, PASSWORDS.get(user) if password is None else password)
        if tls:
            self.c.tls_set(ca_certs=str(broker.ca), cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.port = port or broker.device_port

    def connect(self) -> int:
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        return self.connack.get(timeout=10)

    def subscribe(self, topic: str) -> list[int]:
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def received(self, timeout: float) -> list[tuple[str, bytes]]:
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def clients(broker: TlsBroker) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connected(clients: list[Client], broker: TlsBroker, user: str, **kw) -> Client:  # type: ignore[no-untyped-def]
    c = Client(broker, user, **kw)
    assert c.connect() == 0, f"{user} was refused"
    clients.append(c)
    return c


def test_devices_publish_only_their_own_telemetry(broker: TlsBroker, clients: list[Client]) -> None:
    fleet = connected(clients, broker, "edgefleet-fleet", port=broker.fleet_port)
    assert fleet.subscribe("edgefleet/v1/devices/+/health") == [1]
    a = connected(clients, broker, "dev-a")
    b = connected(clients, broker, "dev-b")

    a.publish(TOPIC.format("dev-a", "health"), b"a-own")
    a.publish(TOPIC.format("dev-b", "health"), b"a-forged-as-b")  # the broker drops it silently
    b.publish(TOPIC.format("dev-b", "health"), b"b-own")
    got = fleet.received(1.5)
    assert sorted(got) == [(TOPIC.format("dev-a", "health"), b"a-own"),
                           (TOPIC.format("dev-b", "health"), b"b-own")]


def test_devices_read_only_their_own_desired(broker: TlsBroker, clients: list[Client]) -> None:
    fleet = connected(clients, broker, "edgefleet-fleet", port=broker.fleet_port)
    a = connected(clients, broker, "dev-a")
    assert a.subscribe(TOPIC.format("dev-a", "desired")) == [1]
    # Mosquitto 2.0.11 grants the SUBACK and filters each message; newer ones answer 0x80.
    assert a.subscribe(TOPIC.format("dev-b", "desired")) in ([0x80], [1])
    a.subscribe("edgefleet/v1/devices/+/desired")  # a wildcard is granted, but filtered per topic
    fleet.publish(TOPIC.format("dev-b", "desired"), b"for-b")
    fleet.publish(TOPIC.format("dev-a", "desired"), b"for-a")
    got = a.received(1.5)
    assert got and {t for t, _ in got} == {TOPIC.format("dev-a", "desired")}
    assert all(p == b"for-a" for _, p in got)


def test_devices_cannot_read_others_telemetry(broker: TlsBroker, clients: list[Client]) -> None:
    a = connected(clients, broker, "dev-a")
    b = connected(clients, broker, "dev-b")
    a.subscribe("edgefleet/v1/devices/#")
    b.publish(TOPIC.format("dev-b", "health"), b"b-private")
    b.publish(TOPIC.format("dev-b", "status"), b"b-status")
    assert a.received(1.0) == []


def test_fleet_sees_everything_and_reader_reads_only(broker: TlsBroker, clients: list[Client]) -> None:
    fleet = connected(clients, broker, "edgefleet-fleet", port=broker.fleet_port)
    reader = connected(clients, broker, "edgefleet-reader", port=broker.fleet_port)
    for kind in ("status", "health", "event"):
        assert fleet.subscribe(f"edgefleet/v1/devices/+/{kind}") == [1]
        assert reader.subscribe(f"edgefleet/v1/devices/+/{kind}") == [1]
    a = connected(clients, broker, "dev-a")
    b = connected(clients, broker, "dev-b")
    for name, dev in (("dev-a", a), ("dev-b", b)):
        for kind in ("status", "health", "event"):
            dev.publish(TOPIC.format(name, kind), kind.encode())
    assert len(fleet.received(1.5)) == 6
    assert len(reader.received(0.5)) == 6
    b_desired = connected(clients, broker, "dev-b")
    b_desired.subscribe(TOPIC.format("dev-b", "desired"))
    reader.publish(TOPIC.format("dev-b", "desired"), b"reader-may-not")
    assert b_desired.received(1.0) == []


def test_client_id_is_the_user_name_on_the_device_listener(broker: TlsBroker, clients: list[Client]) -> None:
    """dev-a connecting with client id 'dev-b' must not take over dev-b's session."""
    b = connected(clients, broker, "dev-b", client_id="dev-b")
    assert b.subscribe(TOPIC.format("dev-b", "desired")) == [1]
    connected(clients, broker, "dev-a", client_id="dev-b")
    fleet = connected(clients, broker, "edgefleet-fleet", port=broker.fleet_port)
    fleet.publish(TOPIC.format("dev-b", "desired"), b"still-connected")
    assert b.received(1.5) == [(TOPIC.format("dev-b", "desired"), b"still-connected")]


def test_devices_cannot_log_in_on_the_fleet_listener(broker: TlsBroker, clients: list[Client]) -> None:
    """The fleet listener knows the fleet's logins only: a device cannot pick a client id there
    (another device's, or a fleet process's) and take over its session; nor can a service
    account log in on the device listener (where its client id would be forced anyway)."""
    b = connected(clients, broker, "dev-b", client_id="dev-b")
    assert b.subscribe(TOPIC.format("dev-b", "desired")) == [1]
    not_authorised = 135
    for attempt in (Client(broker, "dev-a", port=broker.fleet_port, client_id="dev-b"),
                    Client(broker, "edgefleet-fleet")):
        try:
            assert attempt.connect() == not_authorised
        finally:
            attempt.close()
    fleet = connected(clients, broker, "edgefleet-fleet", port=broker.fleet_port)
    fleet.publish(TOPIC.format("dev-b", "desired"), b"still-connected")
    assert b.received(1.5) == [(TOPIC.format("dev-b", "desired"), b"still-connected")]


def test_refused_without_password_tls_or_with_a_wrong_one(broker: TlsBroker) -> None:
    not_authorised = 135  # paho's reason code for the MQTT 3.1.1 CONNACK 5
    assert Client(broker, "dev-a", password="wrong").connect() == not_authorised
    anon = Client(broker, "", password="")
    anon.c.username_pw_set(None)
    assert anon.connect() == not_authorised
    plain = Client(broker, "dev-a", tls=False)
    with pytest.raises((ConnectionError, OSError, TimeoutError, queue.Empty)):
        plain.c.connect("127.0.0.1", broker.device_port, keepalive=5)
        plain.c.loop_start()
        try:
            assert plain.connack.get(timeout=1) != 0
        finally:
            plain.c.loop_stop()
