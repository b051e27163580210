"""DSSE envelopes: signatures cover the exact payload bytes, never a re-serialisation.

Rules:
- the signed message is PAE(payloadType, payload) as in the DSSE spec;
- a verifier checks signatures over the raw bytes first and parses the payload only
  after enough trusted keys signed it;
- each key counts once, however many signatures name it; unknown key ids are ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from shared import strictjson
from shared.bundle import sigcheck
from shared.bundle.keys import key_id
from shared.errors import MalformedDocumentError, SignatureError

if TYPE_CHECKING:  # cryptography loads when a signature is made or checked (shared.bundle.sigcheck)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MANIFEST_TYPE = "application/vnd.edgefleet.manifest.v1+json"
ROOT_TYPE = "application/vnd.edgefleet.root.v1+json"

MAX_ENVELOPE_BYTES = 1 << 20
MAX_SIGNATURES = 32


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class Signature(msgspec.Struct, frozen=True):
    keyid: str
    sig: bytes


class Envelope(msgspec.Struct, frozen=True):
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        return strictjson.dumps(
            {
                "payloadType": self.payload_type,
                "payload": base64.b64encode(self.payload).decode(),
                "signatures": [
                    {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()}
                    for s in self.signatures
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
        doc = strictjson.loads(data, max_bytes=max_bytes, what="envelope")
        if not isinstance(doc, dict) or set(doc) != {"payloadType", "payload", "signatures"}:
            raise MalformedDocumentError(
                "envelope must hold exactly payloadType, payload and signatures"
            )
        ptype, payload, sigs = doc["payloadType"], doc["payload"], doc["signatures"]
        if not isinstance(ptype, str) or not isinstance(payload, str):
            raise MalformedDocumentError("envelope payloadType and payload must be strings")
        if not isinstance(sigs, list) or not sigs:
            raise MalformedDocumentError("envelope has no signatures")
        if len(sigs) > MAX_SIGNATURES:
            raise MalformedDocumentError(f"envelope has {len(sigs)} signatures, max {MAX_SIGNATURES}")
        parsed = []
        for entry in sigs:
            if (
                not isinstance(entry, dict)
                or set(entry) != {"keyid", "sig"}
                or not isinstance(entry["keyid"], str)
                or not isinstance(entry["sig"], str)
            ):
                raise MalformedDocumentError("each signature must hold exactly keyid and sig")
            parsed.append(Signature(entry["keyid"], _b64(entry["sig"], "signature")))
        return cls(ptype, _b64(payload, "payload"), tuple(parsed))


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedDocumentError(f"envelope {what} is not valid base64") from None


def sign(payload_type: str, payload: bytes, keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    message = pae(payload_type, payload)
    sigs = tuple(Signature(key_id(k.public_key()), k.sign(message)) for k in keys)
    if not sigs:
        raise ValueError("at least one signing key is needed")
    return Envelope(payload_type, payload, sigs)


def valid_keyids(envelope: Envelope, trusted: Mapping[str, bytes]) -> set[str]:
    """Key ids among ``trusted`` (key id -> raw Ed25519 public key) whose signature over the
    envelope verifies."""
    message = pae(envelope.payload_type, envelope.payload)
    candidates = [(s.keyid, (trusted[s.keyid], s.sig)) for s in envelope.signatures if s.keyid in trusted]
    answers = sigcheck.check(message, [item for _, item in candidates])
    return {keyid for (keyid, _), ok in zip(candidates, answers, strict=True) if ok}


def verify(
    envelope: Envelope,
    *,
    payload_type: str,
    trusted: Mapping[str, bytes],
    threshold: int,
    role: str,
) -> bytes:
    """Return the payload bytes once ``threshold`` distinct trusted keys signed them."""
    if envelope.payload_type != payload_type:
        raise SignatureError(
            f"envelope carries {envelope.payload_type!r}, expected {payload_type!r}"
        )
    if threshold < 1:
        raise SignatureError(f"role {role} has threshold {threshold}; it must be at least 1")
    good = valid_keyids(envelope, trusted)
    if len(good) < threshold:
        named = {s.keyid for s in envelope.signatures}
        unknown = len(named - set(trusted))
        raise SignatureError(
            f"{role}: {len(good)} valid signature(s) from trusted keys, threshold is {threshold}"
            + (f" ({unknown} signature(s) by keys this role does not trust)" if unknown else ""),
            valid=len(good),
            threshold=threshold,
        )
    return envelope.payload
