"""The MQTT 5 ``content-type`` of each encoding (docs/telemetry.md, docs/asyncapi.json).

Every message is published with it on MQTT 5; on MQTT 3.1.1, which has no properties, the
first byte tells (``messages.detect``)."""

from __future__ import annotations

from shared.telemetry.messages import Encoding, detect

JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES: dict[Encoding, str] = {"json": JSON, "msgpack": MSGPACK}


def content_type(payload: bytes) -> str:
    """The content type of an encoded message."""
    return CONTENT_TYPES[detect(payload)]
