"""Make a device key and its certificate request, in a short-lived child process.

``python -m agent.identity.keygen DEVICE_ID KEY_PATH``: writes a new EC P-256 key to
KEY_PATH (PKCS#8 PEM, mode 0600, atomically: the file is complete or absent) and prints
the CSR (PEM, subject ``CN=DEVICE_ID``, no extensions) on stdout. The resident agent never
imports cryptography for this: its OpenSSL bindings cost ~7.6 MB of RSS that a process
cannot give back (shared/bundle/sigcheck.py measured it), and a key is made once per
certificate lifetime.
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_key_and_csr(device_id: str, key_path: Path) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from shared.fsutil import atomic_write

    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    key_path.chmod(0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent.identity.keygen DEVICE_ID KEY_PATH", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(make_key_and_csr(argv[0], Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
