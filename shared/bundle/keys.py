"""Ed25519 keys on disk and their key ids (SHA-256 of the raw public key).

cryptography is imported where a key object is made, not with this module: a device agent
never makes one (it checks signatures with raw public keys, in a child process:
shared.bundle.sigcheck).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from shared.digest import sha256_hex
from shared.errors import MalformedDocumentError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return key_id_of_raw(raw_public(key))


def key_id_of_raw(raw: bytes) -> str:
    return sha256_hex(raw)  # small: without OpenSSL (shared.digest)


def raw_from_hex(value: str) -> bytes:
    """The 32 raw bytes of a hex Ed25519 public key, checked for form only."""
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise MalformedDocumentError("public key is not hex") from None
    if len(raw) != 32:
        raise MalformedDocumentError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
    return raw


def generate() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def save_private(key: Ed25519PrivateKey, path: Path) -> None:
    """Write a private key as PKCS#8 PEM, readable by the owner only."""
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())


def load_private(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise MalformedDocumentError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MalformedDocumentError(f"{path} is not an Ed25519 private key")
    return key
