"""A real Mosquitto with a TLS listener, a password file and per-device ACLs, for tests.

The CA and the broker certificate are made here with ``cryptography``; a second CA that
signed nothing the broker uses lets a test prove that the clients refuse a broker they do
not trust. The ACL is packaging/mosquitto/edgefleet.acl itself, so the tests check the
file operators install.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import free_port, mosquitto_binary

REPO = Path(__file__).resolve().parents[1]
ACL_FILE = REPO / "packaging" / "mosquitto" / "edgefleet.acl"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(directory: Path, ca_key: ec.EllipticCurvePrivateKey,
                     ca_cert: x509.Certificate) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, pem = directory / "broker.crt", directory / "broker.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pem)
    return crt, pem


@dataclass
class TlsBroker:
    """Mosquitto: ``tls_port`` (TLS, devices: use_username_as_clientid) and ``fleet_port``
    (TLS, the fleet's listener), password file and ACL as in packaging/mosquitto."""

    directory: Path
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the broker's certificate
    password_file: Path
    tls_port: int
    fleet_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def fleet_url(self) -> str:
        return f"mqtts://localhost:{self.fleet_port}"

    def start(self) -> None:
        binary = mosquitto_binary()
        assert binary
        log = (self.directory / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.directory / "mosquitto.conf")],
                                     stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(_listening(p) for p in (self.tls_port, self.fleet_port)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.log()}")

    def log(self) -> str:
        return (self.directory / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_tls_broker(directory: Path) -> TlsBroker:
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, ca_key, ca_cert = make_ca(directory, "test-ca")
    other_ca, _, _ = make_ca(directory, "other-ca")
    crt, key = make_server_cert(directory, ca_key, ca_cert)
    password_file = directory / "passwd"
    password_file.write_text("")
    password_file.chmod(0o600)
    broker = TlsBroker(directory, ca_file, other_ca, password_file, free_port(), free_port())
    tls = f"cafile {ca_file}\ncertfile {crt}\nkeyfile {key}\ntls_version tlsv1.2\n"
    # Started as root, Mosquitto drops to user "mosquitto", who cannot read pytest's tmp dirs.
    user = "user root\n" if os.geteuid() == 0 else ""
    (directory / "mosquitto.conf").write_text(
        f"{user}per_listener_settings false\nallow_anonymous false\n"
        f"password_file {password_file}\nacl_file {ACL_FILE}\npersistence false\n"
        f"listener {broker.tls_port} 127.0.0.1\nuse_username_as_clientid true\n{tls}"
        f"listener {broker.fleet_port} 127.0.0.1\n{tls}"
    )
    return broker
