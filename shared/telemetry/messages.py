"""Telemetry payloads, version 1 (JSON). Readers ignore fields they do not know, so a
fleet older than its agents still stores their telemetry (fields are only ever added
within v1); signed documents, unlike telemetry, refuse unknown fields. Every message
names its schema version ``v``.

Health carries both the counts of its window (since the previous health message) and
totals since the agent started, so a subscriber that missed a message can still
compute rates; ``seq`` increases by one per message a device sends, across kinds,
so a gap shows loss.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shared import strictjson
from shared.errors import MalformedDocumentError

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

# Update lifecycle event kinds and the device-side reason codes they may carry.
EVENT_KINDS = (
    "download_started",
    "verified",
    "staged",
    "smoke_passed",
    "activated",
    "committed",
    "rolled_back",
    "failed",
)
REASON_CODES = (
    "signature",  # signatures did not verify or threshold not met
    "scope",  # signing keys not delegated for this model
    "expired",  # manifest, delegation or root past expiry
    "rollback",  # release older than (or same number as) one already accepted
    "agent_version",  # bundle needs a newer agent
    "malformed",  # manifest or file not in the expected format
    "length",  # a file longer or shorter than the manifest says
    "hash",  # a file's hash differs from the manifest
    "download",  # network or HTTP error fetching a file
    "disk_full",  # not enough space to stage the bundle
    "load",  # the runtime could not load the model
    "smoke_test",  # golden vectors did not match
    "trial_errors",  # error rate during the trial window past the local bound
    "runtime_crash",  # the process died while the release was on trial
    "superseded",  # the fleet asked for another release mid-update
)


class ModelHealth(msgspec.Struct):
    name: str
    release: int
    version: str
    state: str
    inferences: int
    errors: int
    total_inferences: int
    total_errors: int
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    # Input drift of the window against the release's baseline (PSI; None: no baseline,
    # or too few values yet). drift is the highest of drift_inputs.
    drift: float | None = None
    drift_inputs: dict[str, float] | None = None


class Health(msgspec.Struct):
    v: int
    device_id: str
    seq: int
    ts: float
    interval_s: float
    models: list[ModelHealth]
    cpu_percent: float
    mem_rss_mb: float
    mem_percent: float
    disk_free_mb: float
    temperature_c: float | None = None
    uptime_s: float = 0.0
    dropped: int = 0
    # Added in v1 (readers of older agents see the defaults): drops by kind, the backlog of
    # the on-disk spool when this message was made, and the whole device's CPU.
    dropped_health: int = 0
    dropped_events: int = 0
    spooled: int = 0
    device_cpu_percent: float | None = None


class Status(msgspec.Struct):
    v: int
    device_id: str
    online: bool
    ts: float
    agent_version: str = ""
    seq: int = 0


class Event(msgspec.Struct):
    v: int
    device_id: str
    seq: int
    ts: float
    model: str
    kind: str
    release: int
    from_release: int | None = None
    reason: str | None = None
    message: str = ""


class DesiredNotice(msgspec.Struct):
    v: int
    generation: int
    ts: float


Message = Health | Status | Event | DesiredNotice
_BY_KIND: dict[str, type] = {
    "health": Health,
    "status": Status,
    "event": Event,
    "desired": DesiredNotice,
}


def encode(message: Message) -> bytes:
    return msgspec.json.encode(message)


def decode(kind: str, payload: bytes, *, device_id: str | None = None) -> Message:
    """Validate a payload received on a topic of ``kind``; refuse mismatched device ids."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise MalformedDocumentError(f"unknown message kind {kind!r}")
    msg = strictjson.decode(payload, cls, max_bytes=MAX_MESSAGE_BYTES, what=f"{kind} message")
    if msg.v != VERSION:
        raise MalformedDocumentError(f"{kind} message version {msg.v}, this reader knows {VERSION}")
    if device_id is not None and getattr(msg, "device_id", device_id) != device_id:
        raise MalformedDocumentError(
            f"{kind} message names device {msg.device_id!r} but came on {device_id!r}'s topic"
        )
    if isinstance(msg, Event):
        if msg.kind not in EVENT_KINDS:
            raise MalformedDocumentError(f"event kind {msg.kind!r} is not one of {EVENT_KINDS}")
        if msg.reason is not None and msg.reason not in REASON_CODES:
            raise MalformedDocumentError(f"event reason {msg.reason!r} is not a known code")
    return msg


EventKind = Literal[
    "download_started", "verified", "staged", "smoke_passed",
    "activated", "committed", "rolled_back", "failed",
]
