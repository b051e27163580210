"""Device certificates (mutual TLS with the broker, docs/deployment.md).

- ``POST /api/v1/devices/{id}/certificate``: the device, with its own credential, sends a
  CSR made on the device (the key never leaves it); the fleet's device CA signs it
  (fleet.identity.ca checks it) and answers the certificate, the CA certificate and when
  to renew. A renewal is the same call; older certificates stay valid until they expire,
  so a renewal never cuts a device off;
- ``GET /api/v1/certificates/ca``: the device CA's certificate (public), for the broker's
  ``cafile``;
- ``GET /api/v1/devices/{id}/certificates`` (read) lists what was issued;
- ``POST /api/v1/devices/{id}/certificates/revoke`` (admin) revokes every live
  certificate of the device: CRL rewritten, broker reloaded, the device's session ended.
  The device is not revoked: it is asked to rotate its credentials (``rotate_credential``
  in its desired state), so it makes a new key and gets a new certificate. To cut a device
  off, revoke the device (``POST /api/v1/devices/{id}/revoke``), which revokes its
  certificates too.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import ServiceUnavailableException
from litestar.params import FromPath, JSONBody
from sqlmodel import Session, col, select

from fleet.api.auth import device_guard, operator_guard
from fleet.api.context import AppContext
from fleet.api.response_schemas import DEVICE_READ, CertificatesRevoked, CertificateView, ok
from fleet.api.schemas import BAD_REQUEST, DEVICE_RESPONSES
from fleet.db.engine import session_scope
from fleet.db.models import Device, DeviceCertificate, as_utc, now_utc
from fleet.errors import NotFoundError
from fleet.identity.ca import MAX_CSR_BYTES, DeviceCA, DeviceCAError
from fleet.identity.store import device_ca, publish_revocation, record_issued, revoke_device_certificates
from shared.contract.certificates import CertificateAnswer, CertificateRequest
from shared.timeutil import format_time, format_ts

log = logging.getLogger(__name__)

# A device renews once this fraction of its certificate's lifetime has passed.
RENEW_AT_FRACTION = 2 / 3


def certificate_json(row: DeviceCertificate) -> dict[str, Any]:
    revoked = as_utc(row.revoked_at)
    return {
        "serial": row.serial,
        "fingerprint_sha256": row.fingerprint,
        "issued_at": format_time(row.issued_at),
        "not_after": format_time(row.not_after),
        "revoked_at": format_ts(revoked) if revoked else None,
    }


def _device_ca(ctx: AppContext) -> DeviceCA:
    """The CA of the settings; a CA that cannot be loaded is the fleet's fault: 503."""
    try:
        return device_ca(ctx.settings)
    except (DeviceCAError, OSError) as exc:
        log.error("device CA: %s", exc)
        raise ServiceUnavailableException(detail=f"the fleet's device CA is not usable: {exc}") from None


class CertificateController(Controller):
    path = "/api/v1"
    tags = ["certificates"]

    @post(
        "/devices/{device_id:str}/certificate",
        guards=[device_guard],
        sync_to_thread=True,
        status_code=201,
        summary="Sign the device's certificate request (issue or renew its client certificate)",
        description=f"Body: {{\"csr\": PEM}} of at most {MAX_CSR_BYTES} bytes, subject exactly "
        "CN=<device id>, EC P-256/P-384 or RSA 2048-4096, no extensions requested. "
        "400 names the check a request failed.",
        responses={**DEVICE_RESPONSES, **BAD_REQUEST},
    )
    def sign(self, device_id: FromPath[str], data: JSONBody[CertificateRequest],
             state: State) -> CertificateAnswer:
        ctx: AppContext = state.ctx
        settings = ctx.settings
        ca = _device_ca(ctx)
        lifetime = dt.timedelta(days=settings.device_cert_days)
        try:
            issued = ca.sign(data.csr.encode(), device_id, lifetime=lifetime)
        except DeviceCAError as exc:  # the fleet's fault, not the device's: never a 400
            log.error("certificate for %s: %s", device_id, exc)
            raise ServiceUnavailableException(
                detail=f"the fleet cannot sign certificates now: {exc}") from None
        with session_scope(ctx.engine) as session:
            record_issued(session, issued)
        renew = issued.not_before + (issued.not_after - issued.not_before) * RENEW_AT_FRACTION
        return CertificateAnswer(
            device_id=device_id, serial=format(issued.serial, "x"), certificate=issued.pem.decode(),
            ca_certificate=ca.cert_pem.decode(), not_after=format_ts(issued.not_after),
            renew_after=format_ts(renew), not_after_ts=issued.not_after.timestamp(),
            renew_after_ts=renew.timestamp(),
        )

    @get(
        "/certificates/ca",
        sync_to_thread=True,
        summary="The device CA's certificate (PEM)",
        description="Public: the broker's cafile for devices that log in with a certificate.",
        security=[{}],
        media_type="application/x-pem-file",
    )
    def ca_certificate(self, state: State) -> Response[bytes]:
        ctx: AppContext = state.ctx
        return Response(_device_ca(ctx).cert_pem, media_type="application/x-pem-file")

    @get(
        "/devices/{device_id:str}/certificates",
        guards=[operator_guard],
        sync_to_thread=True,
        summary="The certificates issued to a device, newest first",
        responses={**ok(list[CertificateView], "Its certificates, newest first"), **DEVICE_READ},
    )
    def list_certificates(self, device_id: FromPath[str], state: State) -> list[dict[str, Any]]:
        ctx: AppContext = state.ctx
        with Session(ctx.engine) as session:
            rows = session.exec(
                select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
                .order_by(col(DeviceCertificate.issued_at).desc())
            ).all()
            if not rows and session.get(Device, device_id) is None:
                raise NotFoundError(f"device {device_id!r} is not enrolled and holds no certificate",
                                    device_id=device_id)
            return [certificate_json(r) for r in rows]

    @post(
        "/devices/{device_id:str}/certificates/revoke",
        guards=[operator_guard],
        opt={"scope": "admin"},
        sync_to_thread=True,
        status_code=200,
        summary="Revoke every live certificate of a device; the broker refuses it from now on",
        responses={**ok(CertificatesRevoked, "The serials revoked, the CRL written"), **DEVICE_READ},
    )
    def revoke(self, device_id: FromPath[str], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        notice = None
        with session_scope(ctx.engine) as session:
            revoked = revoke_device_certificates(session, device_id)
            device = session.get(Device, device_id)
            if revoked and device is not None and device.revoked_at is None:
                # the device itself stays trusted: it is asked to rotate its credentials, and
                # so makes a new key and gets a new certificate at its next pull
                device.rotation_requested_at = now_utc()
                device.generation += 1
                session.add(device)
                notice = (device.id, device.generation)
        if notice is not None:
            ctx.controller.notify([notice])
        if not revoked:
            with Session(ctx.engine) as session:
                if session.get(Device, device_id) is None and not session.exec(
                    select(DeviceCertificate.serial).where(DeviceCertificate.device_id == device_id)
                ).first():
                    raise NotFoundError(f"device {device_id!r} is not enrolled and holds no certificate",
                                        device_id=device_id)
        path, reloaded, disconnected = publish_revocation(ctx.settings, ctx.engine, device_id)
        return {"device_id": device_id, "revoked": revoked, "crl_file": str(path),
                "broker_reloaded": reloaded, "disconnected": disconnected}

