"""The agent's device certificate: the config key, the key made in a child process (0600,
atomic), the fleet's answer checked, a failed request leaving the pair in use untouched."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import ConfigError, parse_config
from agent.fleet_client import FleetClient
from agent.identity.certificate import CertificateError, DeviceCertificate
from agent.identity.keygen import make_key_and_csr

from .conftest import free_port

BASE = {"device_id": "dev-1", "state_dir": "/tmp/s", "trust_root": "/etc/root.json"}
FLEET = {"url": "http://127.0.0.1:8080", "enrollment_token": "t"}


def test_config_certificate_fleet() -> None:
    cfg = parse_config({**BASE, "fleet": FLEET, "mqtt": {"certificate": "fleet"}})
    assert cfg.mqtt.fleet_certificate
    assert not parse_config({**BASE, "fleet": FLEET, "mqtt": {}}).mqtt.fleet_certificate


@pytest.mark.parametrize(("mqtt", "fleet", "named"), [
    ({"certificate": "yes"}, True, "mqtt.certificate"),
    ({"certificate": "fleet"}, False, "[fleet]"),
    ({"certificate": "fleet", "url": "mqtt://h:1883"}, True, "TLS URL"),
    ({"certificate": "fleet", "cert_file": "/etc/hostname"}, True, "exclude each other"),
])
def test_config_certificate_refusals(mqtt: dict[str, Any], fleet: bool, named: str) -> None:
    doc = {**BASE, "mqtt": mqtt, **({"fleet": FLEET} if fleet else {})}
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_config(doc)


def test_keygen_writes_a_private_key_and_a_csr_for_the_device(tmp_path: Path) -> None:
    key_path = tmp_path / "key.pem"
    csr = x509.load_pem_x509_csr(make_key_and_csr("dev-9", key_path))
    assert csr.subject.rfc4514_string() == "CN=dev-9" and csr.is_signature_valid
    assert key_path.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == csr.public_key().public_numbers()  # type: ignore[union-attr]


def test_unreachable_fleet_leaves_no_stray_key(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with httpx.Client(timeout=2) as http:
        fleet = FleetClient(url=url, device_id="dev-1", enrollment_token="t", labels={},
                            state_dir=tmp_path, client=http)
        # a credential as if enrolled, so the request itself is what fails
        (tmp_path / "device.json").write_text(
            f'{{"device_id":"dev-1","credential":"c","mqtt_url":null,"fleet_url":"{url}"}}')
        cert = DeviceCertificate(fleet, tmp_path)
        assert cert.due() and cert.files() is None
        t0 = time.monotonic()
        with pytest.raises(CertificateError, match="no device certificate"):
            cert.ensure()
        # the key made for the failed request is removed; a retry waits (no request storm)
        assert list((tmp_path / "tls").glob("*.pem")) == []
        with pytest.raises(CertificateError, match="last request failed"):
            cert.ensure()
        assert time.monotonic() - t0 < 10


def test_certificate_mode_never_falls_back_to_a_plain_broker(tmp_path: Path, keyring: Any) -> None:
    """The fleet hands out an mqtt:// URL: the agent refuses to log in without its certificate."""
    from litestar.testing import TestClient

    from agent.main import Agent
    from fleet.app import create_app
    from fleet.settings import Settings

    settings = Settings(data_dir=tmp_path / "fleet", database_url=f"sqlite:///{tmp_path / 'f.db'}",
                        keys_dir=keyring.directory, admin_token="a" * 24, enrollment_token="e" * 24,
                        run_ingester=False, run_controller=False, public_mqtt_url="mqtt://127.0.0.1:9")
    with TestClient(create_app(settings)) as http:
        cfg = parse_config({**BASE, "state_dir": str(tmp_path / "agent"),
                            "trust_root": str(keyring.root_path),
                            "fleet": {"url": "http://testserver.local", "enrollment_token": "e" * 24},
                            "mqtt": {"certificate": "fleet"}, "api": {"listen": ""}})
        agent = Agent(cfg, http=http)
        seen: list[logging.LogRecord] = []
        handler = logging.Handler(logging.ERROR)
        handler.emit = seen.append  # type: ignore[method-assign]
        logging.getLogger("agent").addHandler(handler)  # the fleet app rewires the root logger
        try:
            assert agent._start_reporter() is True
        finally:
            logging.getLogger("agent").removeHandler(handler)
        assert agent.reporter is None
        assert any("needs an mqtts:// broker" in r.getMessage() for r in seen)


def test_renewal_times_follow_the_device_clock() -> None:
    """The fleet's times moved onto the device's clock by their difference (HTTP Date)."""
    from agent.identity.certificate import on_local_clock

    fleet_now, renew_after = 1_800_000_000.0, 1_800_000_000.0 + 20 * 86400
    # a device a year ahead renews 20 days from its own now, not at once
    ahead = fleet_now + 365 * 86400
    assert on_local_clock(renew_after, fleet_now, ahead) == ahead + 20 * 86400
    # a device whose clock was never set (1970) does not wait decades
    assert on_local_clock(renew_after, fleet_now, 10.0) == 10.0 + 20 * 86400
    assert on_local_clock(renew_after, None, ahead) == renew_after  # no Date: the fleet's time


def test_a_fleet_answering_nonsense_is_retried_later_not_at_every_poll(tmp_path: Path) -> None:
    """A 201 whose body is not a certificate answer: refused by name, and not asked again at once."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"device_id": "dev-1", "serial": 5}'
            self.send_response(201)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with httpx.Client(timeout=5) as http:
            fleet = FleetClient(url=url, device_id="dev-1", enrollment_token="t", labels={},
                                state_dir=tmp_path, client=http)
            (tmp_path / "device.json").write_text(
                f'{{"device_id":"dev-1","credential":"c","mqtt_url":null,"fleet_url":"{url}"}}')
            cert = DeviceCertificate(fleet, tmp_path)
            with pytest.raises(CertificateError, match="certificate answer"):
                cert.ensure()
            with pytest.raises(CertificateError, match="last request failed"):
                cert.ensure()
            assert hits == ["/api/v1/devices/dev-1/certificate"]
            assert list((tmp_path / "tls").glob("*.pem")) == []
    finally:
        server.shutdown()
