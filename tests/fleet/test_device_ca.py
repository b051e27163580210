"""The device CA's decisions, without servers: what it signs, what it refuses (and says
why), what the certificates and the CRL it writes contain."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.identity.ca import (
    MAX_CSR_BYTES,
    CertificateRequestError,
    DeviceCA,
    DeviceCAError,
    write_crl,
)

DAY = dt.timedelta(days=1)


def csr_pem(cn: str = "dev-1", key=None, *, names=None, san: list[str] | None = None) -> bytes:  # type: ignore[no-untyped-def]
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = names or [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> DeviceCA:
    return DeviceCA.create()


def test_signs_a_client_certificate_for_the_device(ca: DeviceCA) -> None:
    now = dt.datetime.now(dt.UTC)
    issued = ca.sign(csr_pem("dev-1"), "dev-1", lifetime=30 * DAY, now=now)
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert cert.subject.rfc4514_string() == "CN=dev-1" and cert.issuer == ca.cert.subject
    assert cert.serial_number == issued.serial
    assert issued.not_after == cert.not_valid_after_utc
    assert abs((cert.not_valid_after_utc - now) - 30 * DAY) < dt.timedelta(seconds=1)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.cert)
    assert issued.fingerprint == cert.fingerprint(hashes.SHA256()).hex()


def test_rsa_keys_of_accepted_sizes(ca: DeviceCA) -> None:
    ca.sign(csr_pem(key=rsa.generate_private_key(65537, 2048)), "dev-1", lifetime=DAY)


@pytest.mark.parametrize(
    ("make", "check"),
    [
        (lambda: csr_pem("dev-2"), "subject"),
        (lambda: csr_pem(names=[x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]), "subject"),
        (lambda: csr_pem(san=["dev-1", "broker.example"]), "extensions"),
        (lambda: csr_pem(key=ec.generate_private_key(ec.SECP256K1())), "key"),
        (lambda: csr_pem(key=rsa.generate_private_key(65537, 1024)), "key"),
        (lambda: csr_pem(key=ed25519.Ed25519PrivateKey.generate()), "key"),
        (lambda: b"hello", "format"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "format"),
        (lambda: b"x" * (MAX_CSR_BYTES + 1), "size"),
    ],
)
def test_refusals_name_the_check(ca: DeviceCA, make, check: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CertificateRequestError) as err:
        ca.sign(make(), "dev-1", lifetime=DAY)
    assert err.value.check == check and check in str(err.value)


def test_a_tampered_request_fails_its_signature(ca: DeviceCA) -> None:
    """A CSR whose signature does not verify: no proof of holding the key."""
    forged = x509.load_pem_x509_csr(csr_pem("dev-1"))
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit of the signature
    import base64
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
           + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CertificateRequestError) as err:
        ca.sign(pem, "dev-1", lifetime=DAY)
    assert err.value.check == "signature"


def test_lifetime_is_bounded_by_the_setting_and_the_ca(ca: DeviceCA) -> None:
    with pytest.raises(DeviceCAError):
        ca.sign(csr_pem(), "dev-1", lifetime=dt.timedelta(days=5000))
    late = ca.cert.not_valid_after_utc - dt.timedelta(days=2)
    issued = ca.sign(csr_pem(), "dev-1", lifetime=30 * DAY, now=late)
    assert issued.not_after == ca.cert.not_valid_after_utc


def test_crl_lists_revoked_serials(ca: DeviceCA, tmp_path: Path) -> None:
    a = ca.sign(csr_pem(), "dev-1", lifetime=DAY)
    b = ca.sign(csr_pem(), "dev-1", lifetime=DAY)
    now = dt.datetime.now(dt.UTC)
    crl = x509.load_pem_x509_crl(ca.crl([(a.serial, now)], now=now))
    assert crl.is_signature_valid(ca.key.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(b.serial) is None
    assert crl.next_update_utc is not None and crl.next_update_utc - now > dt.timedelta(days=3000)
    path = tmp_path / "crl" / "crl.pem"
    write_crl(path, crl.public_bytes(serialization.Encoding.PEM))
    assert x509.load_pem_x509_crl(path.read_bytes()).get_revoked_certificate_by_serial_number(a.serial)
    assert path.stat().st_mode & 0o777 == 0o644


def test_load_or_create_keeps_one_ca(tmp_path: Path) -> None:
    first = DeviceCA.load_or_create(tmp_path / "ca")
    again = DeviceCA.load_or_create(tmp_path / "ca")
    assert first.cert == again.cert
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "ca" / "ca.crt").write_bytes(DeviceCA.create().cert_pem)
    with pytest.raises(DeviceCAError, match="does not match"):
        DeviceCA.load(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_bytes(b"junk")
    with pytest.raises(DeviceCAError, match="not PEM"):
        DeviceCA.load(tmp_path / "ca")
