"""Issuing and cutting off a device's credentials: the API credential (stored as its SHA-256)
and, when the fleet keeps the broker's password file, the device's broker password.

``issue_credentials`` is the one place credentials are made (enrollment, re-enrollment,
rotation); another way of authenticating devices (certificates) hooks in beside it.
The broker is written before the database: if the password file cannot be written the old
credentials stay valid and the caller answers 503.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from litestar.exceptions import ServiceUnavailableException
from sqlalchemy.orm import object_session

from fleet.api.auth import credential_hash, new_credential
from fleet.api.context import AppContext
from fleet.broker.passwords import BrokerPasswordFile, PasswordFileError, new_password
from fleet.db.models import Device
from fleet.identity.store import revoke_with_device

log = logging.getLogger(__name__)

# How long a device's previous API credential stays valid after a rotation: a device whose
# answer was lost on the way asks again with the old one.
ROTATION_OVERLAP_S = 3600.0


@dataclass(frozen=True)
class IssuedCredentials:
    credential: str
    broker_password: str | None


def broker_passwords(ctx: AppContext) -> BrokerPasswordFile | None:
    if ctx.settings.mqtt_password_file is None:
        return None
    return BrokerPasswordFile(ctx.settings.mqtt_password_file, ctx.settings.mqtt_reload_command)


def issue_credentials(ctx: AppContext, device_id: str) -> IssuedCredentials:
    """New credentials for ``device_id``; the broker password is already stored (and the
    broker reloaded) when this returns. The caller stores ``credential_hash`` of the API one."""
    credential = new_credential()
    broker_password = None
    passwords = broker_passwords(ctx)
    if passwords is not None:
        broker_password = new_password()
        try:
            passwords.set(device_id, broker_password)
        except PasswordFileError as exc:
            log.error("credentials of %s: %s", device_id, exc)
            raise ServiceUnavailableException(
                detail="the broker password file cannot be updated; retry later"
            ) from None
    return IssuedCredentials(credential, broker_password)


def apply_credentials(device: Device, issued: IssuedCredentials, *, now: datetime,
                      previous_hash: str | None, overlap_s: float = ROTATION_OVERLAP_S) -> None:
    """Store the new API credential on ``device``; ``previous_hash`` (the credential the device
    proved itself with) stays valid for ``overlap_s``."""
    device.credential_hash = credential_hash(issued.credential)
    if previous_hash and previous_hash != device.credential_hash:
        device.previous_credential_hash = previous_hash
        device.previous_credential_until = now + timedelta(seconds=overlap_s)
    else:
        device.previous_credential_hash = None
        device.previous_credential_until = None
    device.rotation_requested_at = None
    device.reenroll_requested_at = None
    device.reenroll_approved_until = None
    device.revoked_at = None


def cut_off(ctx: AppContext, device: Device) -> None:
    """No credential of ``device`` works any more: the API ones are dropped, its broker login
    is replaced by a secret nobody keeps and the broker's reload ends its session at once."""
    passwords = broker_passwords(ctx)
    if passwords is not None:
        try:
            passwords.revoke(device.id)
        except PasswordFileError as exc:
            log.error("revocation of %s: %s", device.id, exc)
            raise ServiceUnavailableException(
                detail="the broker password file cannot be updated; the device is not revoked; retry"
            ) from None
    session = object_session(device)
    if session is not None:  # its certificates too: CRL and broker once the caller commits
        # object_session() is typed as SQLAlchemy's Session; the fleet's are all sqlmodel's
        revoke_with_device(session, ctx.settings, ctx.engine, device.id)  # type: ignore[arg-type]
    device.credential_hash = "revoked"  # never the SHA-256 of anything
    device.previous_credential_hash = None
    device.previous_credential_until = None
    device.rotation_requested_at = None
