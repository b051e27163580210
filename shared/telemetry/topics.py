"""MQTT topic layout, version 1. Documented for third-party subscribers in docs/telemetry.md.

    edgefleet/v1/devices/{device_id}/status   device -> all, retained: birth and last will
    edgefleet/v1/devices/{device_id}/health   device -> fleet, QoS 1: periodic health
    edgefleet/v1/devices/{device_id}/event    device -> fleet, QoS 1: update lifecycle events
    edgefleet/v1/devices/{device_id}/desired  fleet -> device, QoS 1, retained: "pull now"
"""

from __future__ import annotations

import re

from shared.errors import MalformedDocumentError

PREFIX = "edgefleet/v1/devices"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
KINDS = ("status", "health", "event", "desired")


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise MalformedDocumentError(
            f"device id {device_id!r} must match {DEVICE_ID_RE.pattern} "
            "(letters, digits, '.', '_', '-'; no '/', '+' or '#')"
        )
    return device_id


def topic(device_id: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{PREFIX}/{check_device_id(device_id)}/{kind}"


def subscription(kind: str) -> str:
    """Wildcard subscription for one kind across all devices."""
    return f"{PREFIX}/+/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """Split a topic into (device_id, kind), refusing anything off the layout."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or parts[4] not in KINDS:
        raise MalformedDocumentError(f"topic {name!r} is not on the edgefleet/v1 layout")
    return check_device_id(parts[3]), parts[4]
