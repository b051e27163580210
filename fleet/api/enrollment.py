"""Who may enroll as which device: pure decisions, named refusals (docs/install.md "Devices").

Rules (Mender's "a known identity with new credentials waits for acceptance", AWS IoT's
"a claim credential can only ask for a device credential"):

- an enrollment token only ever *creates* devices. It is the settings' bootstrap token or a
  token made with ``POST /api/v1/enrollment-tokens`` that may expire, be limited in uses and
  be revoked (rotation: make a new one, hand it to new devices, revoke the old one; enrolled
  devices never use it again);
- re-enrolling a known id needs proof of being that device: its current credential (or the
  previous one within the rotation overlap) as ``Authorization: Bearer``; or the device
  secret it made and stored before it first enrolled (``device_secret``: an enrollment whose
  answer was lost is simply made again, as Mender accepts a known key again); or an
  operator's approval (``edgefleet device approve``), used once before it runs out. Without
  any of them the attempt is recorded as pending (the operator sees it) and refused;
- a revoked device enrolls again only after an operator approved it;
- ids and labels that could collide with MQTT topic syntax or paths are refused.

Everything here takes data and the time and answers a decision or raises; the handlers in
``fleet.api.devices`` do the I/O.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any

from fleet.db.models import Device, EnrollmentToken, as_utc
from shared.errors import EdgefleetError, MalformedDocumentError
from shared.telemetry.topics import check_device_id

RESERVED_ID_PREFIX = "edgefleet-"  # broker service accounts; never a device
MAX_LABELS = 64
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Printable ASCII without the MQTT wildcards, path separators and quotes: labels end up in
# selectors, file names of reports and Prometheus labels.
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9 _.:@=,;()\[\]-]{0,128}\Z")
MAX_TOKEN_NAME = 128


class EnrollmentTokenRefused(EdgefleetError):
    """The enrollment token is unknown, revoked, expired or used up (HTTP 401)."""

    code = "enrollment_token"


class ReenrollmentNeedsProof(EdgefleetError):
    """A known device id, no proof of being that device and no operator approval (HTTP 403)."""

    code = "reenrollment_needs_proof"


class DeviceRevoked(EdgefleetError):
    """The device is revoked; only an operator's approval lets it enroll again (HTTP 403)."""

    code = "device_revoked"


def check_new_device_id(device_id: str) -> str:
    check_device_id(device_id)
    if device_id.lower().startswith(RESERVED_ID_PREFIX):
        # the broker's service accounts (edgefleet-fleet, edgefleet-reader) share the
        # password file with devices: a device must never take one of their names
        raise MalformedDocumentError(
            f"device id {device_id!r}: ids beginning with {RESERVED_ID_PREFIX!r} are reserved"
        )
    return device_id


def check_labels(labels: Any) -> dict[str, str]:
    """Labels as stored: at most MAX_LABELS, keys and values of safe characters."""
    if not isinstance(labels, dict):
        raise MalformedDocumentError("labels must be an object of strings")
    if len(labels) > MAX_LABELS:
        raise MalformedDocumentError(f"{len(labels)} labels, at most {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY_RE.match(key):
            raise MalformedDocumentError(
                f"label key {str(key)[:80]!r} must match {LABEL_KEY_RE.pattern} "
                "(1-64 letters, digits, '.', '_', '-')"
            )
        if not isinstance(value, str) or not LABEL_VALUE_RE.match(value):
            raise MalformedDocumentError(
                f"label {key!r} value {str(value)[:80]!r} must be at most 128 printable ASCII "
                "characters without '+', '#', '/', '\\', quotes or control characters"
            )
    return dict(labels)


def check_token_name(name: str) -> str:
    if len(name) > MAX_TOKEN_NAME or any(not c.isprintable() for c in name):
        raise MalformedDocumentError(f"name must be at most {MAX_TOKEN_NAME} printable characters")
    return name


def check_enrollment_token(row: EnrollmentToken | None, now: datetime) -> None:
    """Whether a stored enrollment token may enroll one more device; raises why not."""
    if row is None:
        raise EnrollmentTokenRefused("the enrollment token is not valid")
    if row.revoked_at is not None:
        raise EnrollmentTokenRefused(f"enrollment token {row.id} is revoked", token_id=row.id)
    expires = as_utc(row.expires_at)
    if expires is not None and now >= expires:
        raise EnrollmentTokenRefused(
            f"enrollment token {row.id} expired at {expires.isoformat()}", token_id=row.id,
            expires_at=expires.isoformat())
    if row.max_uses is not None and row.uses >= row.max_uses:
        raise EnrollmentTokenRefused(
            f"enrollment token {row.id} is used up ({row.uses} of {row.max_uses} enrollments)",
            token_id=row.id, uses=row.uses, max_uses=row.max_uses)


class Proof(enum.Enum):
    NONE = "none"
    CREDENTIAL = "credential"  # the device's current (or overlapping previous) credential
    SECRET = "device_secret"  # the secret the device made before it first enrolled
    APPROVAL = "approval"  # an operator approved one re-enrollment


class Admission(enum.Enum):
    NEW = "new"  # a new device
    REENROLL = "reenroll"  # a known device, proven


def credential_matches(device: Device, presented_hash: str | None, now: datetime) -> bool:
    """Whether a credential hash is the device's current one or its previous one within the
    rotation overlap."""
    if not presented_hash or device.revoked_at is not None:
        return False
    if presented_hash == device.credential_hash:
        return True
    until = as_utc(device.previous_credential_until)
    return (presented_hash == device.previous_credential_hash and until is not None and now < until)


def admit(device: Device | None, presented_hash: str | None, now: datetime,
          secret_hash: str | None = None) -> tuple[Admission, Proof]:
    """May this enrollment go ahead for ``device`` (None: the id is new)? ``presented_hash``:
    of the credential sent as proof; ``secret_hash``: of the device secret. Raises why not."""
    if device is None:
        return Admission.NEW, Proof.NONE
    approved = as_utc(device.reenroll_approved_until)
    if approved is not None and now < approved:
        return Admission.REENROLL, Proof.APPROVAL
    if device.revoked_at is not None:
        revoked = as_utc(device.revoked_at)
        raise DeviceRevoked(
            f"device {device.id!r} was revoked at {revoked.isoformat() if revoked else '?'}; it enrolls "
            f"again only after an operator approves it ('edgefleet device approve {device.id}')",
            device_id=device.id)
    if credential_matches(device, presented_hash, now):
        return Admission.REENROLL, Proof.CREDENTIAL
    if secret_hash and device.device_secret_hash and secret_hash == device.device_secret_hash:
        return Admission.REENROLL, Proof.SECRET
    raise ReenrollmentNeedsProof(
        f"device {device.id!r} is already enrolled: re-enrolling it needs its current credential "
        f"('Authorization: Bearer <credential>'), its device secret or an operator's approval "
        f"('edgefleet device approve {device.id}'); the enrollment token alone only enrolls new devices",
        device_id=device.id, proof="none")


def check_device_secret(secret: str | None) -> str | None:
    """A device secret is 32-128 printable ASCII characters (the agent makes 43)."""
    if secret is not None and not (32 <= len(secret) <= 128 and secret.isascii() and secret.isprintable()):
        raise MalformedDocumentError("device_secret must be 32-128 printable ASCII characters")
    return secret
