"""The MQTT contract as an AsyncAPI 3.0 document with JSON Schema, made from the message types.

The payload schemas are msgspec's JSON Schema of the Structs in ``shared.telemetry.messages``
(draft-07 forms only, as AsyncAPI's default schema format takes), with the event kinds and
reason codes of ``shared.telemetry.vocabulary`` as enums. Each health and event message has two
forms: ``application/json`` (an object with field names) and ``application/msgpack`` (a
positional array in field order, nested structs too: the ``...Array`` schemas; trailing
fields with defaults may be missing, unknown trailing ones are allowed). Status messages and
desired notices are always JSON. Every message carries its content type as the MQTT 5
``content-type`` property (MQTT 3.1.1 has none: there the first byte tells, ``{`` for JSON).

The document is checked in as docs/asyncapi.json; tests/contract checks it equals ``document()``
and that a subscriber written from it alone accepts real agents' messages. After changing a
message type: ``python -m shared.contract.asyncapi docs/asyncapi.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from shared.telemetry import messages, topics
from shared.telemetry.content import CONTENT_TYPES, JSON

REF = "#/components/schemas/{name}"
_TYPES: dict[str, type[msgspec.Struct]] = {
    "status": messages.Status,
    "health": messages.Health,
    "event": messages.Event,
    "desired": messages.DesiredNotice,
}

# kind -> (direction, retained, encodings, what it is)
_CHANNELS: dict[str, tuple[str, bool, tuple[messages.Encoding, ...], str]] = {
    "status": ("send", True, ("json",),
               "Birth (online true, on every connect), death (online false, on a clean stop) and "
               "the last will the broker publishes when the device drops off. Retained."),
    "health": ("send", False, ("json", "msgpack"),
               "Periodic health: per model its release, serving state, inference and error counts "
               "of the window and since start, latency quantiles, drift; the device's CPU, memory, "
               "disk and temperature. seq rises by one per message of any kind of a session."),
    "event": ("send", False, ("json", "msgpack"),
              "Update lifecycle events of one model, with a reason code when something was refused "
              "or rolled back."),
    "desired": ("receive", True, ("json",),
                "From the fleet: the desired state changed (generation); the device pulls "
                "GET /api/v1/devices/{device_id}/desired. Retained."),
}


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(list(_TYPES.values()), ref_template=REF)
    for name in ("Event", "LastEvent"):
        props = components[name]["properties"]
        props["kind"] = {"enum": list(messages.EVENT_KINDS)}
        props["reason"] = {"anyOf": [{"enum": list(messages.REASON_CODES)}, {"type": "null"}],
                           "default": None}
    for cls in (messages.Health, messages.ModelHealth, messages.ShadowHealth,
                messages.LastEvent, messages.Event):
        components[cls.__name__ + "Array"] = _array_schema(cls, components[cls.__name__])
    return dict(sorted(components.items()))


def _to_array_refs(schema: Any) -> Any:
    """A field's schema with references to a struct's object form turned to its array form."""
    if isinstance(schema, dict):
        return {k: (v + "Array" if k == "$ref" else _to_array_refs(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_to_array_refs(v) for v in schema]
    return schema


def _array_schema(cls: type[msgspec.Struct], obj: dict[str, Any]) -> dict[str, Any]:
    fields = msgspec.structs.fields(cls)
    required = sum(1 for f in fields
                   if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT)
    return {
        "title": f"{cls.__name__} (msgpack)",
        "description": f"{cls.__name__} as MessagePack: its fields as an array in this order "
                       f"({', '.join(f.name for f in fields)}).",
        "type": "array",
        "items": [_to_array_refs(obj["properties"][f.encode_name]) for f in fields],
        "additionalItems": True,
        "minItems": required,
    }


def _message(kind: str, encoding: messages.Encoding) -> dict[str, Any]:
    name = _TYPES[kind].__name__
    return {
        "name": f"{kind}-{encoding}",
        "title": f"{name} ({encoding})",
        "contentType": CONTENT_TYPES[encoding],
        "payload": {"$ref": REF.format(name=name + ("Array" if encoding == "msgpack" else ""))},
    }


def document() -> dict[str, Any]:
    """The AsyncAPI document of topic layout v1 and message version ``messages.VERSION``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    component_messages: dict[str, Any] = {}
    for kind, (action, retained, encodings, what) in _CHANNELS.items():
        refs = {}
        for encoding in encodings:
            key = f"{kind}-{encoding}"
            component_messages[key] = _message(kind, encoding)
            refs[key] = {"$ref": f"#/components/messages/{key}"}
        channels[kind] = {
            "address": f"{topics.PREFIX}/{{device_id}}/{kind}",
            "description": what,
            "parameters": {"device_id": {"$ref": "#/components/parameters/device_id"}},
            "messages": refs,
        }
        operations[kind] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{kind}"},
            "messages": [{"$ref": f"#/channels/{kind}/messages/{key}"} for key in refs],
            "bindings": {"mqtt": {"qos": 1, "retain": retained, "bindingVersion": "0.2.0"}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "edgefleet device telemetry",
            "version": f"{messages.VERSION}",
            "description": "The MQTT topics and payloads between edgefleet agents and the fleet, "
                           "seen from a device: it sends status, health and event, it receives "
                           "desired. Readers ignore fields they do not know (fields are only "
                           "added within v1). Generated from shared/telemetry/messages.py by "
                           "shared/contract/asyncapi.py; docs/telemetry.md tells the rest.",
        },
        "defaultContentType": JSON,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": component_messages,
            "parameters": {"device_id": {
                "description": f"The device id: it matches {topics.DEVICE_ID_RE.pattern} "
                               "(no '/', '+' or '#'). A subscriber may use '+' for every device."}},
        },
    }


def render() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """``python -m shared.contract.asyncapi [PATH]``: write the document (to stdout without PATH)."""
    if not argv:
        sys.stdout.write(render())
    else:
        Path(argv[0]).write_text(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
