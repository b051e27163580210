"""Operators manage device identities: relabel, revoke, delete, rotate credentials, approve a
re-enrollment (docs/install.md "Devices: enroll, rotate, revoke").

- revoke: no credential of the device works any more, at once: its API credential is
  dropped and its broker login replaced (the broker's reload ends its session); the row
  stays, shown as revoked, until deleted. Only an operator's approval lets it enroll again;
- delete (``DELETE /api/v1/devices/{id}``, in fleet.api.devices): the device and its
  assignments go; its broker login is cut off like a revoke;
  the id may then enroll again with an enrollment token as a new device;
- rotate: the device is asked (in its desired state, ``rotate_credential``) to fetch new
  credentials with its current ones (POST /api/v1/devices/{id}/credential); the old API
  credential stays valid for the overlap window. A fleet-wide rotation asks every device;
  no device is ever left without a working credential;
- approve: allows one re-enrollment of a known (or revoked) id with an enrollment token
  only, until ``valid_s`` from now: the way back for a device that lost its state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgspec
from litestar import Controller, post, put
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlmodel import Session, col, select

from fleet.api.auth import operator_guard
from fleet.api.context import AppContext
from fleet.api.device_credentials import cut_off
from fleet.api.devices import _get_device, device_json
from fleet.api.enrollment import check_labels
from fleet.api.response_schemas import (
    BAD_LABEL,
    DEVICE_CHANGE,
    DEVICE_READ,
    READ,
    DeviceView,
    RotationRequested,
    ok,
)
from fleet.db.engine import session_scope
from fleet.db.models import Device, now_utc
from shared.errors import MalformedDocumentError

log = logging.getLogger(__name__)

MAX_APPROVAL_S = 7 * 86400


class LabelsRequest(msgspec.Struct, forbid_unknown_fields=True):
    labels: dict[str, str]


class ApproveRequest(msgspec.Struct, forbid_unknown_fields=True):
    valid_s: float = 3600.0


def _notify(ctx: AppContext, notices: list[tuple[str, int]]) -> None:
    """Tell devices over MQTT that their desired state changed (they pull it over HTTP)."""
    if notices:
        ctx.controller.notify(notices)


def _json(ctx: AppContext, session: Session, device: Device) -> dict[str, Any]:
    return device_json(session, device, ctx.settings.silence_after_s)


def _change(ctx: AppContext, device_id: str, change: Callable[[Device], None]) -> dict[str, Any]:
    """Apply ``change`` to the device (404 when it is not enrolled) in one transaction; its
    JSON as stored after the change."""
    with session_scope(ctx.engine) as session:
        device = _get_device(session, device_id)
        change(device)
        session.add(device)
        session.flush()
        return _json(ctx, session, device)


class DeviceAdminController(Controller):
    path = "/api/v1/devices"
    tags = ["devices"]
    guards = [operator_guard]

    @put("/{device_id:str}/labels", sync_to_thread=True, summary="Replace a device's labels",
         responses={**ok(DeviceView, "The device, relabelled"), **DEVICE_CHANGE, **BAD_LABEL})
    def relabel(self, device_id: FromPath[str], data: JSONBody[LabelsRequest],
                state: State) -> dict[str, Any]:
        labels = check_labels(data.labels)

        def relabel(device: Device) -> None:
            device.labels = labels

        return _change(state.ctx, device_id, relabel)

    @post("/{device_id:str}/revoke", sync_to_thread=True, status_code=200, opt={"scope": "admin"},
          summary="Revoke a device: its API and broker credentials stop working at once",
          responses={**ok(DeviceView, "The device, revoked"), **DEVICE_READ})
    def revoke(self, device_id: FromPath[str], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx

        def revoke(device: Device) -> None:
            cut_off(ctx, device)
            device.revoked_at = device.revoked_at or now_utc()
            device.online = False
            device.reenroll_approved_until = None

        body = _change(ctx, device_id, revoke)
        log.warning("device %s revoked", device_id)
        return body

    @post("/{device_id:str}/rotate", sync_to_thread=True, status_code=200, opt={"scope": "admin"},
          summary="Ask a device to rotate its credentials (it does on its next desired-state pull)",
          responses={**ok(DeviceView, "The device, asked to rotate"), **DEVICE_CHANGE})
    def rotate(self, device_id: FromPath[str], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx

        def rotate(device: Device) -> None:
            if device.revoked_at is not None:
                raise MalformedDocumentError(
                    f"device {device_id!r} is revoked; it has no credential to rotate")
            device.rotation_requested_at = now_utc()
            device.generation += 1

        body = _change(ctx, device_id, rotate)
        _notify(ctx, [(device_id, body["generation"])])
        return body

    @post("/rotate", sync_to_thread=True, status_code=200, opt={"scope": "admin"},
          summary="Ask every (not revoked) device to rotate its credentials",
          responses={**ok(RotationRequested, "How many devices were asked"), **READ})
    def rotate_all(self, state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        now = now_utc()
        with session_scope(ctx.engine) as session:
            devices = session.exec(select(Device).where(col(Device.revoked_at).is_(None))).all()
            for device in devices:
                device.rotation_requested_at = now
                device.generation += 1
                session.add(device)
            notices = [(d.id, d.generation) for d in devices]
        _notify(ctx, notices)
        return {"requested": len(notices)}

    @post("/{device_id:str}/approve", sync_to_thread=True, status_code=200, opt={"scope": "admin"},
          summary="Allow one re-enrollment of this id with an enrollment token only",
          responses={**ok(DeviceView, "The device, its re-enrollment allowed until reenroll_approved_until"),
                     **DEVICE_CHANGE})
    def approve(self, device_id: FromPath[str], data: JSONBody[ApproveRequest],
                state: State) -> dict[str, Any]:
        if not 0 < data.valid_s <= MAX_APPROVAL_S:
            raise MalformedDocumentError(f"valid_s {data.valid_s} must be in (0, {MAX_APPROVAL_S}]")

        def approve(device: Device) -> None:
            device.reenroll_approved_until = now_utc() + timedelta(seconds=data.valid_s)

        return _change(state.ctx, device_id, approve)
