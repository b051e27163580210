"""Enrollment, credential rotation and trust-root pages: the HTTP documents of a device's identity.

POST /api/v1/devices/enroll takes an ``EnrollRequest`` and answers an ``EnrollResponse``;
POST /api/v1/devices/{id}/credential (rotation) answers an ``EnrollResponse`` too;
GET /api/v1/trust/roots answers a ``RootsPage``.
"""

from __future__ import annotations

import msgspec

# what the fleet's embedded broker speaks; the only other hint it gives is MQTT "5"
MQTT_PROTOCOL_HINTS = ("3.1.1", "5")


class EnrollRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    device_id: str
    token: str
    labels: dict[str, str] = {}
    # made and stored by the device before its first enrollment: proof of being it when it
    # enrolls again (the answer was lost, its state was restored); agents before it send none
    device_secret: str | None = None


class EnrollResponse(msgspec.Struct, omit_defaults=True):
    device_id: str
    # the device's API credential (Authorization: Bearer ...)
    credential: str
    # the broker to report to; None only from fleets that predate it
    mqtt_url: str | None = None
    # The device's broker password (user name = device id), when the fleet keeps the
    # broker's password file (settings.mqtt_password_file); absent otherwise.
    broker_password: str | None = None
    # "3.1.1" when the broker is the fleet's embedded one (amqtt speaks nothing newer), so an
    # agent on protocol "auto" does not spend a connect timeout finding that out; absent when
    # the broker is external (the agent negotiates MQTT 5 and falls back by itself).
    mqtt_protocol: str | None = None


class RootsPage(msgspec.Struct):
    """GET /api/v1/trust/roots: base64 envelopes above ``after``, in order, and the newest."""

    # The newest root version the fleet holds (0: none); a device asks again with
    # ``after`` = the last version it accepted while it is behind.
    latest: int
    # Base64 of each envelope with a version above ``after``, in version order, exactly as signed.
    roots: list[str]
