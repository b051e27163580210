"""The fleet's device CA: it signs certificate requests made on devices and lists the
certificates it revoked.

Rules (pure code: bytes and time in, a certificate, a CRL or a named refusal out):

- a CSR is accepted only when it is PEM of at most ``MAX_CSR_BYTES``, its self-signature
  verifies (the requester holds the key), its subject is exactly ``CN=<device id>`` of the
  device that asks, its key is EC P-256/P-384 or RSA 2048-4096, and it requests no
  extension (no subject alternative names: a device certificate names the device only);
- the certificate the CA issues is a client certificate (``clientAuth``, not a CA) for
  ``lifetime`` (bounded by ``MAX_LIFETIME`` and by the CA's own expiry), with a random
  serial; nothing of the CSR but its subject and key is copied;
- the CRL lists every revoked serial; its ``nextUpdate`` lies far ahead
  (``CRL_VALIDITY``) because an expired CRL makes OpenSSL (and so Mosquitto) refuse every
  device. The fleet re-writes it on each revocation and on start.

The CA's key and certificate live in a directory (``ca.key`` 0600, ``ca.crt``); a new CA
is made there on first use unless the operator put one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import EdgefleetError
from shared.fsutil import atomic_write

MAX_CSR_BYTES = 8192
MAX_LIFETIME = dt.timedelta(days=397)
MIN_LIFETIME = dt.timedelta(hours=1)
CA_LIFETIME = dt.timedelta(days=3650)
CRL_VALIDITY = dt.timedelta(days=3650)
BACKDATE = dt.timedelta(minutes=5)  # device clocks run a little behind
EC_CURVES = ("secp256r1", "secp384r1")
RSA_BITS = (2048, 4096)
CA_KEY, CA_CERT = "ca.key", "ca.crt"


class CertificateRequestError(EdgefleetError):
    """A CSR the CA will not sign; ``check`` names the rule, the details the figures."""

    code = "csr_refused"

    def __init__(self, check: str, message: str, **details: object) -> None:
        super().__init__(f"certificate request refused ({check}): {message}", check=check, **details)
        self.check = check


class DeviceCAError(EdgefleetError):
    """The CA's files are missing, unreadable or do not belong together."""

    code = "device_ca"


@dataclass(frozen=True)
class IssuedCertificate:
    device_id: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER, hex
    pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def parse_csr(pem: bytes) -> x509.CertificateSigningRequest:
    if len(pem) > MAX_CSR_BYTES:
        raise CertificateRequestError("size", f"{len(pem)} bytes, at most {MAX_CSR_BYTES}",
                                      value=len(pem), bound=MAX_CSR_BYTES)
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise CertificateRequestError("format", "not a PEM certificate request "
                                      "('-----BEGIN CERTIFICATE REQUEST-----')")
    try:
        return x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CertificateRequestError("format", f"not a readable PEM certificate request: {exc}") from None


def check_csr(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    """Raise CertificateRequestError unless ``csr`` may become ``device_id``'s certificate."""
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise CertificateRequestError("signature", "the request's self-signature does not verify "
                                      "(it must be signed with the key it certifies)")
    attrs = list(csr.subject)
    cns = [a.value for a in attrs if a.oid == NameOID.COMMON_NAME]
    if len(attrs) != 1 or cns != [device_id]:
        raise CertificateRequestError(
            "subject", f"subject {csr.subject.rfc4514_string()!r} must be exactly CN={device_id}",
            value=csr.subject.rfc4514_string(), expected=f"CN={device_id}")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            raise CertificateRequestError("key", f"EC curve {key.curve.name} is not one of "
                                          f"{', '.join(EC_CURVES)}", value=key.curve.name)
    elif isinstance(key, rsa.RSAPublicKey):
        if not RSA_BITS[0] <= key.key_size <= RSA_BITS[1]:
            raise CertificateRequestError("key", f"RSA key of {key.key_size} bits; {RSA_BITS[0]}-"
                                          f"{RSA_BITS[1]} bits", value=key.key_size, bound=RSA_BITS)
    else:
        raise CertificateRequestError("key", f"{type(key).__name__.lstrip('_')} keys are not accepted; "
                                      f"use EC ({', '.join(EC_CURVES)}) or RSA {RSA_BITS[0]}+")
    requested = [e.oid.dotted_string for e in csr.extensions]
    if requested:
        raise CertificateRequestError(
            "extensions", f"the request asks for extensions {', '.join(requested)}; a device "
            "certificate carries none of the requester's choosing (no subject alternative names)",
            value=requested)


class DeviceCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise DeviceCAError("the device CA's certificate does not match its key")
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str = "edgefleet device CA", *, now: dt.datetime | None = None) -> DeviceCA:
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> DeviceCA:
        key_path, cert_path = Path(directory) / CA_KEY, Path(directory) / CA_CERT
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except OSError as exc:
            raise DeviceCAError(f"device CA in {directory}: {exc.strerror or exc} ({exc.filename})") from None
        except ValueError as exc:
            raise DeviceCAError(f"device CA in {directory} is not PEM key + certificate: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise DeviceCAError(f"device CA key {key_path}: EC or RSA keys only")
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, directory: Path) -> DeviceCA:
        """The CA in ``directory``; made there first when it holds none (under a lock, so
        API processes sharing the directory make one CA, not one each)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (directory / CA_KEY).exists():
                ca = cls.create()
                atomic_write(directory / CA_KEY, ca.key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()), mode=0o600)
                os.chmod(directory / CA_KEY, 0o600)
                atomic_write(directory / CA_CERT, ca.cert_pem)
                return ca
        return cls.load(directory)

    def sign(self, csr_pem: bytes, device_id: str, *, lifetime: dt.timedelta,
             now: dt.datetime | None = None) -> IssuedCertificate:
        """``device_id``'s client certificate for the key of ``csr_pem``."""
        now = now or dt.datetime.now(dt.UTC)
        if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
            raise DeviceCAError(f"certificate lifetime {lifetime} must be between {MIN_LIFETIME} "
                                f"and {MAX_LIFETIME}")
        csr = parse_csr(csr_pem)
        check_csr(csr, device_id)
        ca_end = self.cert.not_valid_after_utc
        not_after = min(now + lifetime, ca_end)
        if not_after <= now:
            raise DeviceCAError(f"the device CA expired on {ca_end.isoformat()}; give the fleet a new one")
        key = csr.public_key()
        cert = (
            x509.CertificateBuilder().subject_name(_name(device_id)).issuer_name(self.cert.subject)
            .public_key(key).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=isinstance(key, rsa.RSAPublicKey),
                                         data_encipherment=False,
                                         key_agreement=isinstance(key, ec.EllipticCurvePublicKey),
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return IssuedCertificate(
            device_id=device_id, serial=cert.serial_number, not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            pem=cert.public_bytes(serialization.Encoding.PEM),
        )

    def crl(self, revoked: Iterable[tuple[int, dt.datetime]], *, now: dt.datetime | None = None) -> bytes:
        """A PEM CRL of the ``(serial, revoked at)`` pairs, valid for CRL_VALIDITY."""
        now = now or dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - BACKDATE).next_update(now + CRL_VALIDITY))
        for serial, at in sorted(set(revoked)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(at if at.tzinfo else at.replace(tzinfo=dt.UTC)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_crl(path: Path, pem: bytes) -> None:
    """Atomically, readable by the broker (0644: a CRL is public)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if Path(path).read_bytes() == pem:
            return
    atomic_write(Path(path), pem, mode=0o644)
