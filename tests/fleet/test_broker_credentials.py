"""Broker credentials from enrollment, end to end against a real TLS Mosquitto with the
packaged ACL: the fleet writes the device's password (mosquitto_passwd's format) and
SIGHUPs the broker, the agent publishes its telemetry with it, the ingester reads it over
TLS; a wrong password and another device's topic are refused; re-enrollment rotates."""

from __future__ import annotations

import base64
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from litestar.testing import TestClient
from sqlmodel import Session, select

from agent.fleet_client import FleetClient
from agent.runtime.host import ModelHost
from agent.telemetry.connection import TlsOptions
from agent.telemetry.reporter import Reporter
from fleet.app import create_app
from fleet.broker.client import target_from_settings
from fleet.broker.passwords import BrokerPasswordFile, hash_password, verify_password
from fleet.db.models import HealthReport
from fleet.ingest.ingester import Ingester
from fleet.settings import Settings
from shared.bundle.keyring import Keyring
from shared.telemetry import topics

from ..conftest import mosquitto_binary
from ..tls_broker import TlsBroker, make_tls_broker

ENROLL = "enroll-" + "z" * 20
FLEET_USER, FLEET_PASSWORD = "edgefleet-fleet", "fleet-secret"


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "dev-1", "s3cret"], check=True)
    _user, encoded = path.read_text().strip().split(":", 1)
    _, _, iterations, salt, _ = encoded.split("$")


    assert hash_password("s3cret", salt=base64.b64decode(salt), iterations=int(iterations)) == encoded
    assert verify_password(encoded, "s3cret") and not verify_password(encoded, "other")


def test_password_file_keeps_other_users_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"{FLEET_USER}:{hash_password(FLEET_PASSWORD)}\n")
    path.chmod(0o640)
    pw = BrokerPasswordFile(path)
    pw.set("dev-1", "a")
    pw.set("dev-2", "b")
    pw.set("dev-1", "c")
    entries = pw.entries()
    assert list(entries) == [FLEET_USER, "dev-1", "dev-2"]
    assert verify_password(entries["dev-1"], "c") and verify_password(entries[FLEET_USER], FLEET_PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o640
    with pytest.raises(ValueError):
        pw.set("a:b", "x")


def test_password_file_is_appended_to_and_compacted_at_twice_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change appends one line (the last line of a user wins, as in Mosquitto); once the
    file doubles it is rewritten with one line per user, keeping its mode."""
    import fleet.broker.passwords as passwords

    monkeypatch.setattr(passwords, "COMPACT_MIN_BYTES", 2000)
    path = tmp_path / "passwd"
    path.write_text(f"{FLEET_USER}:{hash_password(FLEET_PASSWORD)}")  # no final newline
    path.chmod(0o640)
    pw = BrokerPasswordFile(path)
    pw.set("dev-1", "a")
    assert path.read_text().splitlines()[1].startswith("dev-1:")  # appended on a line of its own
    size = path.stat().st_size
    pw.set("dev-1", "b")
    assert path.stat().st_size > size and len(path.read_text().splitlines()) == 3
    assert verify_password(pw.entries()["dev-1"], "b")
    pw.revoke("dev-1")
    assert not verify_password(pw.entries()["dev-1"], "b")
    for i in range(40):  # ~150 bytes a line: compactions happen on the way
        pw.set(f"dev-{i % 5}", f"p{i}")
    lines = path.read_text().splitlines()
    assert len(lines) < 30  # compacted, not 44 lines
    entries = pw.entries()
    assert sorted(entries) == sorted([FLEET_USER, *(f"dev-{i}" for i in range(5))])
    assert all(verify_password(entries[f"dev-{i}"], f"p{35 + i}") for i in range(5))
    assert verify_password(entries[FLEET_USER], FLEET_PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o640
    with pytest.raises(ValueError):
        pw.revoke("a\nb")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TlsBroker]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto")
    b = make_tls_broker(tmp_path / "broker")
    b.password_file.write_text(f"{FLEET_USER}:{hash_password(FLEET_PASSWORD)}\n")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _client(broker: TlsBroker, user: str, password: str, *, fleet: bool = False) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.tls_set_context(ssl.create_default_context(cafile=str(broker.ca_file)))
    return c


def _connack(broker: TlsBroker, user: str, password: str) -> Any:
    """The CONNACK reason code a device login gets."""
    got: list[Any] = []
    c = _client(broker, user, password)
    c.on_connect = lambda cl, u, f, rc, p: got.append(rc)
    c.connect("127.0.0.1", broker.tls_port)
    c.loop_start()
    try:
        wait_for(lambda: bool(got), what=f"the CONNACK for {user}")
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0]


def test_enrollment_credential_end_to_end(broker: TlsBroker, tmp_path: Path, keyring: Keyring) -> None:
    assert broker.proc is not None
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token="admin-" + "x" * 20, enrollment_token=ENROLL,
        run_ingester=False, run_controller=False, public_mqtt_url=broker.url,
        mqtt_password_file=broker.password_file, mqtt_reload_command=f"kill -HUP {broker.proc.pid}",
        mqtt_username=FLEET_USER, mqtt_password=FLEET_PASSWORD, mqtt_ca_file=broker.ca_file,
    )
    with TestClient(create_app(settings)) as http:
        engine = http.app.state.ctx.engine
        # The fleet's ingester over TLS, with the fleet's login (target from the settings).
        ingester = Ingester(engine, target_from_settings(settings, broker.fleet_url),
                            flush_interval_s=0.05)
        ingester.start(wait=15)
        assert ingester.connected.is_set()
        # The agent enrolls: the credential file (0600) carries the broker password.
        state = tmp_path / "agent"
        fc = FleetClient(url="http://testserver.local", device_id="dev-1", enrollment_token=ENROLL,
                         labels={}, state_dir=state, client=http)
        cred = fc.credential()
        assert cred.broker_password and cred.mqtt_url == broker.url
        assert (state / "device.json").stat().st_mode & 0o777 == 0o600
        assert verify_password(BrokerPasswordFile(broker.password_file).entries()["dev-1"],
                               cred.broker_password)
        # ... and publishes its telemetry with it (the SIGHUP made Mosquitto re-read the file).
        rep = Reporter(device_id="dev-1", mqtt_url=cred.mqtt_url, state_dir=state, host=ModelHost(),
                       health_interval_s=3600, username="dev-1", password=cred.broker_password,
                       tls=TlsOptions(ca_file=broker.ca_file))
        rep.start()
        try:
            wait_for(rep.connected.is_set, what=f"the device connection ({rep.last_error})")
            rep.publish_health()
            assert rep.flush(15)

            def stored() -> bool:
                with Session(engine) as s:
                    return s.exec(select(HealthReport).where(HealthReport.device_id == "dev-1")).first() \
                        is not None or ingester.stats.written > 0
            wait_for(stored, what="the health row written by the TLS ingester")

            # A wrong password is refused.
            assert _connack(broker, "dev-1", "wrong").is_failure
            # Another device may not publish on dev-1's topics (the ACL's %u).
            r2 = http.post("/api/v1/devices/enroll", json={"device_id": "dev-2", "token": ENROLL})
            assert r2.status_code == 201
            pw2 = r2.json()["broker_password"]
            wait_for(lambda: not _connack(broker, "dev-2", pw2).is_failure, what="dev-2's login")
            acks: list[Any] = []
            done = threading.Event()
            c = _client(broker, "dev-2", pw2)
            c.on_publish = lambda cl, u, mid, rc, p: (acks.append(rc), done.set())
            c.connect("127.0.0.1", broker.tls_port)
            c.loop_start()
            try:
                c.publish(topics.topic("dev-1", "health"), b"{}", qos=1)
                assert done.wait(15)
            finally:
                c.disconnect()
                c.loop_stop()
            assert acks[0].is_failure and acks[0].value == 135  # Not authorized
            # Re-enrollment (with the device's credential as proof) rotates: the old password
            # stops working, the new one works.
            r3 = http.post("/api/v1/devices/enroll", json={"device_id": "dev-2", "token": ENROLL},
                           headers={"Authorization": f"Bearer {r2.json()['credential']}"})
            pw3 = r3.json()["broker_password"]
            assert pw3 != pw2
            wait_for(lambda: _connack(broker, "dev-2", pw2).is_failure, what="the old password refused")
            assert not _connack(broker, "dev-2", pw3).is_failure
        finally:
            rep.stop()
            ingester.stop()


def test_enrollment_without_password_file_omits_the_field(tmp_path: Path, keyring: Keyring) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token="admin-" + "x" * 20, enrollment_token=ENROLL,
        run_ingester=False, run_controller=False, public_mqtt_url="mqtt://127.0.0.1:1883",
    )
    with TestClient(create_app(settings)) as http:
        r = http.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": ENROLL})
        assert r.status_code == 201 and "broker_password" not in r.json()


def test_enrollment_names_the_protocol_of_the_embedded_broker(tmp_path: Path, keyring: Keyring) -> None:
    """amqtt speaks only 3.1.1: the fleet says so, an external broker is left to negotiation."""
    common = dict(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keyring.directory, admin_token="admin-" + "x" * 20, enrollment_token=ENROLL,
        run_ingester=False, run_controller=False,
    )
    with TestClient(create_app(Settings(**common, public_mqtt_url="mqtt://127.0.0.1:1883"))) as http:
        r = http.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": ENROLL})
        assert r.status_code == 201 and r.json()["mqtt_protocol"] == "3.1.1"
    external = Settings(**common, mqtt_url="mqtt://127.0.0.1:9", run_api=True)
    with TestClient(create_app(external)) as http:
        r = http.post("/api/v1/devices/enroll", json={"device_id": "dev-2", "token": ENROLL})
        assert r.status_code == 201 and "mqtt_protocol" not in r.json()
