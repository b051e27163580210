"""Devices with certificates, end to end: a real agent process makes its key and CSR,
the real fleet (over HTTP) signs it with its device CA, a real Mosquitto runs the shipped
packaging/mosquitto/edgefleet-certificates.conf (require_certificate,
use_identity_as_username, the device CA, the fleet's CRL), the agent's health reaches the
fleet's ingester; another device's certificate cannot publish on its topics or take its
session; a revoked certificate is refused by the broker and its live session ended."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import parse_config
from agent.main import Agent
from fleet.app import create_app
from fleet.broker.passwords import hash_password
from fleet.identity.ca import DeviceCA, write_crl
from fleet.settings import Settings
from shared.bundle.keyring import init_keyring
from shared.telemetry import topics

from ..conftest import free_port, mosquitto_binary
from ..tls_broker import ACL_FILE, TlsBroker, make_ca, make_server_cert
from ..waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "packaging" / "mosquitto" / "edgefleet-certificates.conf"
ADMIN = "admin-" + "c" * 20
ENROLL = "enroll-" + "c" * 20
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}
FLEET_USER, FLEET_PASSWORD = "edgefleet-fleet", "fleet-secret"


def render_shipped_config(d: Path, *, device_port: int, fleet_port: int, files: dict[str, Path]) -> str:
    """The shipped file with this test's paths and ports (and no syslog, no persistence)."""
    text = SHIPPED.read_text()
    for etc, path in files.items():
        assert etc in text, etc
        text = text.replace(etc, str(path))
    text = text.replace("listener 8883\n", f"listener {device_port} 127.0.0.1\n")
    text = text.replace("listener 8884\n", f"listener {fleet_port} 127.0.0.1\n")
    drop = ("persistence", "autosave_interval", "log_dest")
    lines = [ln for ln in text.splitlines() if not ln.startswith(drop)]
    user = ["user root"] if os.geteuid() == 0 else []  # root: Mosquitto would drop to 'mosquitto'
    return "\n".join([*user, *lines, "persistence false", f"log_dest file {d / 'mosquitto.log'}", ""])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[TlsBroker, Path, Path]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto")
    d = tmp_path / "broker"
    d.mkdir()
    ca_file, ca_key, ca_cert = make_ca(d, "test-ca")
    other_ca, _, _ = make_ca(d, "other-ca")
    crt, key = make_server_cert(d, ca_key, ca_cert)
    device_ca_dir, crl = tmp_path / "device-ca", d / "devices.crl"
    write_crl(crl, DeviceCA.load_or_create(device_ca_dir).crl([]))
    passwd = d / "passwd"
    passwd.write_text(f"{FLEET_USER}:{hash_password(FLEET_PASSWORD)}\n")
    b = TlsBroker(d, ca_file, other_ca, passwd, free_port(), free_port())
    files = {
        "/etc/mosquitto/edgefleet-services.passwd": passwd, "/etc/mosquitto/edgefleet.acl": ACL_FILE,
        "/etc/mosquitto/certs/edgefleet-device-ca.crt": device_ca_dir / "ca.crt",
        "/etc/mosquitto/certs/edgefleet-ca.crt": ca_file, "/etc/mosquitto/certs/broker.crt": crt,
        "/etc/mosquitto/certs/broker.key": key, "/etc/mosquitto/certs/edgefleet-devices.crl": crl}
    (d / "mosquitto.conf").write_text(
        render_shipped_config(d, device_port=b.tls_port, fleet_port=b.fleet_port, files=files))
    b.start()
    try:
        yield b, device_ca_dir, crl
    finally:
        b.stop()


def serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the fleet to start")
    return server, thread, f"http://127.0.0.1:{port}"


def device_client(broker: TlsBroker, cert: Path, key: Path | None,
                  client_id: str) -> tuple[mqtt.Client, list[Any]]:
    got: list[Any] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(broker.ca_file))
    if key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    c.tls_set_context(ctx)
    c.on_connect = lambda cl, u, f, rc, p: got.append(("connect", rc))
    c.on_publish = lambda cl, u, mid, rc, p: got.append(("puback", rc))
    return c, got


def refused(broker: TlsBroker, pair: tuple[Path, Path] | None, client_id: str) -> bool:
    """Whether the device listener refuses a login with ``pair`` (None: no certificate).
    With TLS 1.3 the client learns of a refused certificate only after its handshake: no
    CONNACK ever comes."""
    c, got = device_client(broker, *(pair or (Path(), None)), client_id)
    try:
        c.connect("127.0.0.1", broker.tls_port)
        c.loop_start()
        time.sleep(1.5)
    except (ssl.SSLError, OSError):
        return True
    finally:
        c.loop_stop()
    return not any(k == "connect" and not rc.is_failure for k, rc in got)


def other_device_certificate(http: httpx.Client, d: Path, device_id: str) -> tuple[Path, Path]:
    r = http.post("/api/v1/devices/enroll", json={"device_id": device_id, "token": ENROLL})
    cred = r.json()["credential"]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    r = http.post(f"/api/v1/devices/{device_id}/certificate", json={"csr": csr},
                  headers={"Authorization": f"Bearer {cred}"})
    assert r.status_code == 201, r.text
    (d / f"{device_id}.crt").write_text(r.json()["certificate"])
    (d / f"{device_id}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / f"{device_id}.crt", d / f"{device_id}.key"


def health_seq(http: httpx.Client, device_id: str) -> int:
    """The seq of the device's latest health the fleet ingested; -1 before any."""
    r = http.get(f"/api/v1/devices/{device_id}", headers=OPERATOR)
    if r.status_code != 200:
        return -1
    return int((r.json().get("health") or {}).get("seq", -1))


def fleet_settings(broker: tuple[TlsBroker, Path, Path], tmp_path: Path, keys_dir: Path) -> Settings:
    """The fleet on the broker's fleet listener, handing out its device listener, with the
    device CA and CRL the broker reads, SIGHUP as the reload command."""
    b, device_ca_dir, crl = broker
    assert b.proc is not None
    return Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        keys_dir=keys_dir, admin_token=ADMIN, enrollment_token=ENROLL,
        run_controller=False, mqtt_url=b.fleet_url, mqtt_username=FLEET_USER, mqtt_password=FLEET_PASSWORD,
        mqtt_ca_file=b.ca_file, public_mqtt_url=b.url, device_ca_dir=device_ca_dir, mqtt_crl_file=crl,
        mqtt_reload_command=f"kill -HUP {b.proc.pid}", mqtt_shared_subscription=False,
    )


def test_certificate_devices_end_to_end(broker: tuple[TlsBroker, Path, Path], tmp_path: Path) -> None:
    b, _device_ca_dir, crl = broker
    keyring = init_keyring(tmp_path / "keys")
    server, thread, url = serve(fleet_settings(broker, tmp_path, keyring.directory))
    state = tmp_path / "agent"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "dev-1"\nstate_dir = "{state}"\ntrust_root = "{keyring.root_path}"\n'
        f'[fleet]\nurl = "{url}"\nenrollment_token = "{ENROLL}"\npoll_interval_s = 1.0\n'
        f'[mqtt]\nhealth_interval_s = 0.3\nkeepalive_s = 5\nca_file = "{b.ca_file}"\ncertificate = "fleet"\n'
        '[api]\nlisten = "127.0.0.1:0"\n')
    log = tmp_path / "agent.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg), "run"], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=fh,
                                stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=url, timeout=10)
    try:
        # The agent's health, over its certificate, reaches the fleet.
        wait_for(lambda: health_seq(http, "dev-1") >= 0, 40,
                 f"dev-1's health at the fleet; agent log: {log.read_text()[-2000:]}")
        assert "u'dev-1'" in b.log()  # the broker's user name is the certificate's CN
        # The key and CSR were made in a child: the resident agent never mapped cryptography.
        assert "cryptography" not in Path(f"/proc/{proc.pid}/maps").read_text()
        tls = state / "tls"
        keys = list(tls.glob("key-*.pem"))
        assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600
        certs = http.get("/api/v1/devices/dev-1/certificates", headers=OPERATOR).json()
        assert len(certs) == 1 and certs[0]["revoked_at"] is None

        # No certificate: no connection (the TLS handshake fails).
        assert refused(b, None, "nocert")

        # Another device's certificate: its client id becomes its own name (dev-1's session
        # stays), and dev-1's topics refuse it.
        crt2, key2 = other_device_certificate(http, tmp_path, "dev-2")
        c, got = device_client(b, crt2, key2, "dev-1")
        c.connect("127.0.0.1", b.tls_port)
        c.loop_start()
        try:
            wait_for(lambda: any(k == "connect" for k, _ in got), 10, "dev-2's CONNACK")
            c.publish(topics.topic("dev-1", "health"), b"{}", qos=1)
            wait_for(lambda: any(k == "puback" for k, _ in got), 10, "the PUBACK")
        finally:
            c.disconnect()
            c.loop_stop()
        assert [rc.value for k, rc in got if k == "puback"] == [135]  # Not authorized
        assert "Client dev-1 already connected" not in b.log()
        assert "as dev-2 (" in b.log()

        # Revocation: the CRL names the serial, the broker reloads it and ends dev-1's
        # session; a new connection with the revoked certificate is refused.
        old_pair = (tmp_path / "old-cert.pem", tmp_path / "old-key.pem")
        old_pair[0].write_bytes(next(tls.glob("cert-*.pem")).read_bytes())
        old_pair[1].write_bytes(keys[0].read_bytes())
        r = http.post("/api/v1/devices/dev-1/certificates/revoke", headers=OPERATOR)
        assert r.status_code == 200, r.text
        assert r.json()["broker_reloaded"] and r.json()["disconnected"], r.json()
        assert x509.load_pem_x509_crl(crl.read_bytes()).get_revoked_certificate_by_serial_number(
            int(certs[0]["serial"], 16)) is not None
        assert "Client dev-1 already connected, closing old connection" in b.log()  # the takeover
        assert refused(b, old_pair, "dev-1")
        assert "certificate verify failed" in b.log()
        # The device itself is still trusted: asked to rotate, it makes a new key, gets a new
        # certificate and reports again with it.
        def new_certificate() -> bool:
            listed = http.get("/api/v1/devices/dev-1/certificates", headers=OPERATOR).json()
            return len(listed) == 2 and listed[0]["revoked_at"] is None
        wait_for(new_certificate, 30, "dev-1's new certificate")
        before = health_seq(http, "dev-1")
        wait_for(lambda: health_seq(http, "dev-1") > before, 30, "dev-1's health with its new certificate")
        assert old_pair[1].read_bytes() not in [k.read_bytes() for k in tls.glob("key-*.pem")]
        # dev-2 still connects: one revocation cuts one device.
        c, got = device_client(b, crt2, key2, "dev-2")
        c.connect("127.0.0.1", b.tls_port)
        c.loop_start()
        try:
            wait_for(lambda: any(k == "connect" and not rc.is_failure for k, rc in got), 10,
                     "dev-2 after the CRL")
        finally:
            c.disconnect()
            c.loop_stop()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        http.close()
        server.should_exit = True
        thread.join(15)


def test_renewal_moves_the_connection_to_the_new_certificate(broker: tuple[TlsBroker, Path, Path],
                                                             tmp_path: Path) -> None:
    """A renewed certificate is used at once (no restart), nothing spooled is lost, and the
    old key is gone from the device."""
    b = broker[0]
    keyring = init_keyring(tmp_path / "keys")
    server, thread, url = serve(fleet_settings(broker, tmp_path, keyring.directory))
    agent = Agent(parse_config({
        "device_id": "dev-1", "state_dir": str(tmp_path / "agent"), "trust_root": str(keyring.root_path),
        "api": {"listen": "127.0.0.1:0"},
        "fleet": {"url": url, "enrollment_token": ENROLL, "poll_interval_s": 0.3},
        "mqtt": {"health_interval_s": 0.3, "ca_file": str(b.ca_file), "certificate": "fleet"},
    }))
    http = httpx.Client(base_url=url, timeout=10)
    agent.start()
    try:
        wait_for(lambda: agent.reporter is not None and agent.reporter.connected.is_set(), 30,
                 "the agent's certificate connection")
        assert agent.certificate is not None
        first = agent.certificate.meta()
        assert first is not None and not agent.certificate.due()
        assert agent.renew_certificate() is False  # not due: nothing happens
        # Past its renewal time: a new key, a new certificate, the connection moves to it.
        assert agent.renew_certificate(now=first.renew_after_ts + 1) is True
        second = agent.certificate.meta()
        assert second is not None and second.serial != first.serial
        tls = tmp_path / "agent" / "tls"
        assert sorted(p.name for p in tls.glob("*-*.pem")) == sorted([second.key_file, second.cert_file])
        wait_for(lambda: b.log().count("u'dev-1'") >= 2, 20, "the reconnect with the new certificate")
        wait_for(lambda: agent.reporter is not None and agent.reporter.connected.is_set(), 20, "reconnected")
        before = health_seq(http, "dev-1")
        wait_for(lambda: health_seq(http, "dev-1") > before, 20, "health after the renewal")
        # The fleet lists both; the old one stays valid until it expires (no dark period).
        listed = http.get("/api/v1/devices/dev-1/certificates", headers=OPERATOR).json()
        serials = [c["serial"] for c in listed]
        assert serials == [second.serial, first.serial]
        assert agent.reporter is not None and agent.reporter.tls is not None
        assert agent.reporter.tls.cert_file == tls / second.cert_file
    finally:
        agent.stop()
        http.close()
        server.should_exit = True
        thread.join(15)
