"""The device certificate endpoints over real HTTP and a real database (SQLite and
PostgreSQL): a device gets its CSR signed, a bad CSR is refused with the check it failed,
no one gets a certificate for another device, operators list and revoke, the CRL follows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_support import ENROLL, admin, bearer, enroll
from litestar.testing import TestClient

from fleet.app import create_app
from fleet.settings import Settings


def make_csr(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def post_csr(client: TestClient[Any], device_id: str, cn: str, headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/api/v1/devices/{device_id}/certificate", json={"csr": make_csr(cn)},
                       headers=headers)


def test_device_gets_its_csr_signed(client: TestClient[Any]) -> None:
    cred = enroll(client, "dev-1")
    r = post_csr(client, "dev-1", "dev-1", bearer(cred))
    assert r.status_code == 201, r.text
    body = r.json()
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    ca = x509.load_pem_x509_certificate(client.get("/api/v1/certificates/ca").content)
    cert.verify_directly_issued_by(ca)
    assert body["ca_certificate"].encode() == ca.public_bytes(serialization.Encoding.PEM)
    assert cert.subject.rfc4514_string() == "CN=dev-1" and format(cert.serial_number, "x") == body["serial"]
    assert body["renew_after_ts"] < body["not_after_ts"]
    listed = client.get("/api/v1/devices/dev-1/certificates", headers=admin()).json()
    assert [c["serial"] for c in listed] == [body["serial"]] and listed[0]["revoked_at"] is None


def test_refusals(client: TestClient[Any]) -> None:
    cred = enroll(client, "dev-1")
    enroll(client, "dev-2")
    # a CSR naming another device: 400, with the check
    r = post_csr(client, "dev-1", "dev-2", bearer(cred))
    assert r.status_code == 400 and r.json()["code"] == "csr_refused" and "CN=dev-1" in r.json()["detail"]
    # a path naming another device: 403
    r = post_csr(client, "dev-2", "dev-2", bearer(cred))
    assert r.status_code == 403
    # no credential, an operator token: 401, 403
    assert post_csr(client, "dev-1", "dev-1").status_code == 401
    r = client.post("/api/v1/devices/dev-1/certificate", json={"csr": make_csr("dev-1")}, headers=admin())
    assert r.status_code == 403
    # malformed bodies: 400, never 500
    for body in ({"csr": "nope"}, {"csr": 5}, {"pem": make_csr("dev-1")}, {"csr": "x" * 20000}):
        r = client.post("/api/v1/devices/dev-1/certificate", json=body, headers=bearer(cred))
        assert r.status_code == 400, (body, r.text)
    # a device cannot list or revoke
    assert client.get("/api/v1/devices/dev-1/certificates", headers=bearer(cred)).status_code == 403
    assert client.post("/api/v1/devices/dev-1/certificates/revoke", headers=bearer(cred)).status_code == 403
    assert client.post("/api/v1/devices/nobody/certificates/revoke", headers=admin()).status_code == 404
    assert client.get("/api/v1/devices/nobody/certificates", headers=admin()).status_code == 404


def test_revoke_lists_the_serials_in_the_crl(client: TestClient[Any], settings: Settings) -> None:
    cred = enroll(client, "dev-1")
    serials = []
    for _ in range(2):  # a renewal: both stay valid until revoked or expired
        r = client.post("/api/v1/devices/dev-1/certificate", json={"csr": make_csr("dev-1")},
                        headers=bearer(cred))
        serials.append(r.json()["serial"])
    enroll(client, "dev-2")
    r = client.post("/api/v1/devices/dev-1/certificates/revoke", headers=admin())
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["revoked"]) == sorted(serials) and body["disconnected"] is False
    crl = x509.load_pem_x509_crl(Path(body["crl_file"]).read_bytes())
    assert all(crl.get_revoked_certificate_by_serial_number(int(s, 16)) for s in serials)
    listed = client.get("/api/v1/devices/dev-1/certificates", headers=admin()).json()
    assert all(c["revoked_at"] for c in listed)
    # the device stays trusted and is asked to rotate (a new key, a new certificate)
    desired = client.get("/api/v1/devices/dev-1/desired", headers=bearer(cred)).json()
    assert desired["rotate_credential"] is True
    assert client.get("/api/v1/devices/dev-2/desired", headers=admin()).status_code == 403
    # revoking again revokes nothing new; the device may get a new certificate (re-issue)
    assert client.post("/api/v1/devices/dev-1/certificates/revoke", headers=admin()).json()["revoked"] == []
    # read scope cannot revoke
    assert client.post("/api/v1/devices/dev-1/certificates/revoke",
                       headers=bearer("eft_nonexistent")).status_code == 401


def test_fleet_start_writes_the_crl_file(settings: Settings, tmp_path: Path) -> None:
    crl_file = tmp_path / "broker" / "edgefleet-devices.crl"
    with TestClient(create_app(replace(settings, mqtt_crl_file=crl_file))) as c:
        assert c.get("/healthz").status_code == 200
        crl = x509.load_pem_x509_crl(crl_file.read_bytes())
        ca = x509.load_pem_x509_certificate(c.get("/api/v1/certificates/ca").content)
        assert crl.issuer == ca.subject and len(list(crl)) == 0


def test_device_revocation_and_deletion_revoke_its_certificates(client: TestClient[Any],
                                                                settings: Settings) -> None:
    """The device's own revoke (and delete) puts its certificates on the CRL too."""
    serials = {}
    for device in ("dev-1", "dev-2", "dev-3"):
        cred = enroll(client, device)
        r = client.post(f"/api/v1/devices/{device}/certificate", json={"csr": make_csr(device)},
                        headers=bearer(cred))
        serials[device] = int(r.json()["serial"], 16)
    assert client.post("/api/v1/devices/dev-1/revoke", headers=admin()).status_code == 200
    assert client.delete("/api/v1/devices/dev-2", headers=admin()).status_code == 200
    crl_file = Path(settings.data_dir) / "device-ca" / "crl.pem"
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serials["dev-1"]) is not None
    assert crl.get_revoked_certificate_by_serial_number(serials["dev-2"]) is not None
    assert crl.get_revoked_certificate_by_serial_number(serials["dev-3"]) is None
    # a deleted device's certificate stays listed (and on the CRL) until it expires
    listed = client.get("/api/v1/devices/dev-2/certificates", headers=admin()).json()
    assert listed and listed[0]["revoked_at"]
    # a revoked device cannot get a new certificate: its credential no longer works
    r = client.post("/api/v1/devices/dev-1/certificate", json={"csr": make_csr("dev-1")},
                    headers=bearer("whatever"))
    assert r.status_code == 401


def test_certificate_requests_are_rate_limited_per_device(settings: Settings) -> None:
    """Signing costs the fleet CPU: a device's requests share its device bucket."""
    limited = replace(settings, device_rate_per_s=0.01, device_burst=2, public_rate_per_s=0.01,
                      public_burst=1)
    with TestClient(create_app(limited)) as c:
        cred = enroll(c, "dev-1")
        codes = [c.post("/api/v1/devices/dev-1/certificate", json={"csr": make_csr("dev-1")},
                        headers=bearer(cred)).status_code for _ in range(3)]
        assert codes == [201, 201, 429]
        assert [c.get("/api/v1/certificates/ca").status_code for _ in range(2)] == [200, 429]


def test_a_fleet_that_cannot_sign_answers_503(settings: Settings, tmp_path: Path) -> None:
    """A broken CA or a lifetime setting out of bounds is the fleet's fault: 503, never 400/500."""
    bad_dir = tmp_path / "bad-ca"
    bad_dir.mkdir()
    (bad_dir / "ca.key").write_bytes(b"junk")
    (bad_dir / "ca.crt").write_bytes(b"junk")
    cases = [(replace(settings, device_ca_dir=bad_dir), "not usable", "dev-1"),
             (replace(settings, device_cert_days=5000.0), "cannot sign", "dev-2")]
    for broken, said, device in cases:
        with TestClient(create_app(broken)) as c:
            cred = enroll(c, device)
            r = post_csr(c, device, device, bearer(cred))
            assert r.status_code == 503 and said in r.json()["detail"], r.text


def test_approved_reenrollment_revokes_the_old_certificates(client: TestClient[Any]) -> None:
    """A device that lost its state comes back with an operator's approval: the keys of its
    old certificates are no longer accounted for, so they are revoked. A re-enrollment with
    its credential (proof) keeps them."""
    cred = enroll(client, "dev-1")
    first = int(post_csr(client, "dev-1", "dev-1", bearer(cred)).json()["serial"], 16)
    proven = client.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": "x" * 24},
                         headers=bearer(cred))
    assert proven.status_code == 201, proven.text  # proof by credential: nothing revoked
    listed = client.get("/api/v1/devices/dev-1/certificates", headers=admin()).json()
    assert listed[0]["revoked_at"] is None
    r = client.post("/api/v1/devices/dev-1/approve", json={"valid_s": 60}, headers=admin())
    assert r.status_code == 200, r.text
    again = client.post("/api/v1/devices/enroll", json={"device_id": "dev-1", "token": ENROLL})
    assert again.status_code == 201, again.text
    listed = client.get("/api/v1/devices/dev-1/certificates", headers=admin()).json()
    assert listed[0]["revoked_at"] is not None
    crl_file = Path(client.app.state.ctx.settings.data_dir) / "device-ca" / "crl.pem"
    assert x509.load_pem_x509_crl(crl_file.read_bytes()).get_revoked_certificate_by_serial_number(first)
