"""Telemetry payloads, version 1 (JSON). Readers ignore fields they do not know, so a
fleet older than its agents still stores their telemetry (fields are only ever added
within v1); signed documents, unlike telemetry, refuse unknown fields. Every message
names its schema version ``v``.

Health carries both the counts of its window (since the previous health message) and
totals since the agent started, so a subscriber that missed a message can still
compute rates; ``seq`` increases by one per message a device sends, across kinds,
so a gap shows loss.

Encodings (docs/telemetry.md): ``json`` (objects with field names) or ``msgpack``
(MessagePack, each message a positional array in the order of its struct's fields,
nested ModelHealth too, ``v`` first; fields are only ever appended, and a reader ignores
trailing elements it does not know and fills missing trailing ones with their defaults).
``decode`` tells them apart by the first byte, so a reader needs no setting: a JSON
payload starts with ``{``, a MessagePack one with an array or map type byte.
"""

from __future__ import annotations

import functools
import re
import typing
from typing import Any, Literal

import msgspec

from shared import strictjson, strictmsgpack
from shared.errors import MalformedDocumentError
from shared.telemetry import vocabulary

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

# Update lifecycle event kinds and the device-side reason codes they may carry: the texts
# of the enums in shared.telemetry.vocabulary (one list, used by the agent and the fleet).
EVENT_KINDS = tuple(k.value for k in vocabulary.EventKind)
REASON_CODES = vocabulary.REASON_CODES


class ShadowHealth(msgspec.Struct):
    """A candidate release evaluated in shadow; figures cumulative since it was loaded."""

    release: int
    version: str = ""
    metric: str = "argmax"  # "argmax" (class scores) or "tolerance" (the golden tolerance)
    samples: int = 0  # sampled requests run on the candidate (errors included)
    agreed: int = 0  # samples whose outputs agree with the serving release's
    errors: int = 0  # samples the candidate failed on (they do not agree)
    dropped_queue: int = 0  # samples dropped: the shadow queue was full
    dropped_budget: int = 0  # samples dropped: the CPU budget was spent
    agreement: float | None = None  # agreed / samples
    max_abs_error: float | None = None  # worst float output, over all samples
    cosine_min: float | None = None  # lowest cosine of a float output to the serving one
    candidate_p95_ms: float | None = None  # candidate run time, latest samples
    current_p95_ms: float | None = None  # the serving release's latency on the same requests
    busy_fraction: float | None = None  # shadow worker busy time / wall time since loaded


class LastEvent(msgspec.Struct):
    """The latest lifecycle event the agent published for a model, repeated in every health
    message: an event the fleet missed (lost between broker and fleet) is recovered from the
    next health (docs/telemetry.md "Recovering missed events"). No free-text message."""

    seq: int
    ts: float
    kind: str
    release: int
    from_release: int | None = None
    reason: str | None = None


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
    # Shadow evaluation (docs/telemetry.md "Shadow"): the candidate release that runs beside
    # this one on a sample of live requests, compared with it. None: no shadow.
    shadow: ShadowHealth | None = None
    # Update windows and locks (docs/telemetry.md "Waiting and held releases"): what a staged
    # release waits for before activation (None: nothing), and the releases of this model
    # whose files the device keeps (active, previous, last committed, staged).
    waiting: str | None = None
    held: list[int] | None = None
    # The latest lifecycle event published for this model (None: none since the agent started,
    # or an older agent). Appended last: the msgpack layout is positional.
    last_event: LastEvent | None = None


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
    # The agent's session: a new one each time its seq counter starts over (a new install or a
    # wiped state directory); "" from older agents. Readers dedupe by (device, session, seq).
    session: str = ""


class Status(msgspec.Struct):
    v: int
    device_id: str
    online: bool
    ts: float
    agent_version: str = ""
    seq: int = 0
    session: str = ""
    # Birth and death pair like Sparkplug's bdSeq: each MQTT connection of the agent has its
    # number, carried by its birth and by the last will it registered at CONNECT (0: an older
    # agent). The will's ts is after its birth's, so "newest ts wins" never keeps a dead
    # device online; status_supersedes says how a reader orders two statuses.
    bd_seq: int = 0


# How far after its birth a connection's last will is stamped (both are made at CONNECT)
WILL_AFTER_BIRTH_S = 0.001


def status_supersedes(new: Status, old: Status) -> bool:
    """Whether ``new`` replaces ``old`` as a device's state: the later ts wins; at the same ts
    a death wins over a birth. A will registered before its birth is stamped after it, and
    a later connection's birth is stamped after that (its CONNECT came later)."""
    return (new.ts, not new.online) >= (old.ts, not old.online)


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
    session: str = ""


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


ENCODINGS = vocabulary.ENCODINGS
Encoding = Literal["json", "msgpack"]
_JSON_START = b"{ \t\r\n"


def _positional(value: Any) -> Any:
    """Structs as arrays in field order, recursively (the ``msgpack`` encoding's layout)."""
    if isinstance(value, msgspec.Struct):
        return [_positional(getattr(value, f)) for f in value.__struct_fields__]
    if isinstance(value, list):
        return [_positional(v) for v in value]
    return value


def _nested_struct(tp: Any) -> tuple[type[msgspec.Struct] | None, bool]:
    """(the Struct type in a field's type, whether it is a list of them)."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # an optional struct (ModelHealth.shadow)
        tp = next(a for a in args if a is not type(None))
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp, False
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            return item, True
    return None, False


@functools.cache
def _layout(
    cls: type[msgspec.Struct],
) -> tuple[tuple[str, ...], tuple[tuple[str, type[msgspec.Struct], bool], ...]]:
    """(the field names in order, and per field holding Structs: (name, Struct type, list of
    them)); resolving the type hints is slow, so once per class."""
    fields = msgspec.structs.fields(cls)
    nested = []
    for f in fields:
        inner, many = _nested_struct(f.type)
        if inner is not None:
            nested.append((f.name, inner, many))
    return tuple(f.name for f in fields), tuple(nested)


def _named(cls: type[msgspec.Struct], value: Any) -> Any:
    """A positional array back into {field: value} (recursively); extra trailing elements
    (fields of a newer agent) are ignored, missing trailing ones take their defaults."""
    if not isinstance(value, list):
        return value
    names, nested = _layout(cls)
    out = dict(zip(names, value, strict=False))  # in C: only the nested fields take Python
    for name, inner, many in nested:
        item = out.get(name)
        if many and isinstance(item, list):
            out[name] = [_named(inner, v) for v in item]
        elif not many and item is not None:
            out[name] = _named(inner, item)
    return out


def encode(message: Message, encoding: Encoding = "json") -> bytes:
    """``json``: an object with field names; ``msgpack``: a positional MessagePack array."""
    if encoding == "json":
        return msgspec.json.encode(message)
    if encoding == "msgpack":
        return msgspec.msgpack.encode(_positional(message))
    raise ValueError(f"unknown telemetry encoding {encoding!r}, expected one of {ENCODINGS}")


def detect(payload: bytes) -> Encoding:
    """Which encoding a payload is in, from its first byte; MalformedDocumentError if neither."""
    if not payload:
        raise MalformedDocumentError("empty telemetry payload")
    first = payload[0]
    if first in _JSON_START:
        return "json"
    if 0x80 <= first <= 0x9F or first in (0xDC, 0xDD, 0xDE, 0xDF):  # array or map
        return "msgpack"
    raise MalformedDocumentError(
        f"telemetry payload starts with byte 0x{first:02x}: neither a JSON object nor a MessagePack "
        "array or map"
    )


# -- the fast path ------------------------------------------------------------------------
# What agents send is msgspec's own encoding of these Structs. msgspec decodes it straight into
# the Struct (for ``msgpack`` into an ``array_like`` twin of it) in C, with strict types; if
# encoding the result gives back the very same bytes, the payload IS that encoding, so it holds
# no key twice (a Struct or a dict cannot), no unknown field and nothing nested or sized beyond
# the schema, and in JSON no NaN or Infinity (msgspec refuses them; a float out of range fails
# too). MessagePack can carry NaN, so there the bytes of a non-finite float64 are looked for.
# Anything else (a newer agent's extra fields, another encoder, a refusal) takes the strict path
# below, which accepts what it always did and names the problem.
_NONFINITE_F64 = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")  # 0xcb, then exponent all ones


@functools.cache
def _array_type(cls: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """``cls`` as an ``array_like`` Struct, nested Structs too (the ``msgpack`` layout: extra
    trailing elements ignored, missing trailing ones take their defaults, as in ``_named``)."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(cls):
        tp, (inner, many) = f.type, _nested_struct(f.type)
        if inner is not None:
            twin: Any = _array_type(inner)  # a type made at run time: no static form
            tp = list[twin] if many else twin | None if type(None) in typing.get_args(f.type) else twin
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, tp, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, tp, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, tp))
    return msgspec.defstruct(f"{cls.__name__}Array", fields, array_like=True)


@functools.cache
def _decoder(cls: type[msgspec.Struct], encoding: Encoding) -> Any:
    if encoding == "json":
        return msgspec.json.Decoder(cls, strict=True)
    return msgspec.msgpack.Decoder(_array_type(cls), strict=True)


def _decode_fast(cls: type[msgspec.Struct], payload: bytes, encoding: Encoding) -> Message | None:
    """The message if the payload is msgspec's encoding of a valid one, else None (no verdict)."""
    if len(payload) > MAX_MESSAGE_BYTES:
        return None
    try:
        value = _decoder(cls, encoding).decode(payload)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    if encoding == "json":
        return value if msgspec.json.encode(value) == payload else None
    if msgspec.msgpack.encode(value) != payload or _NONFINITE_F64.search(payload):
        return None
    # the twin into cls, nested too; cls is the Struct of one Message kind
    return typing.cast(Message, msgspec.convert(value, cls, from_attributes=True))


def _decode_msgpack(kind: str, cls: type, payload: bytes) -> Message:
    what = f"{kind} message"
    obj = strictmsgpack.loads(payload, max_bytes=MAX_MESSAGE_BYTES, what=what)
    # The version first: another version's positional layout would only fail confusingly.
    version = obj[0] if isinstance(obj, list) and obj else obj.get("v") if isinstance(obj, dict) else None
    if version != VERSION:
        raise MalformedDocumentError(f"{kind} message version {version!r}, this reader knows {VERSION}")
    return strictjson.convert(_named(cls, obj), cls, what=what)


def decode(kind: str, payload: bytes, *, device_id: str | None = None) -> Message:
    """Validate a payload received on a topic of ``kind`` in either encoding (detected);
    refuse mismatched device ids."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise MalformedDocumentError(f"unknown message kind {kind!r}")
    encoding = detect(payload)
    msg = _decode_fast(cls, payload, encoding)
    if msg is None and encoding == "msgpack":
        msg = _decode_msgpack(kind, cls, payload)
    elif msg is None:
        msg = strictjson.decode(payload, cls, max_bytes=MAX_MESSAGE_BYTES, what=f"{kind} message")
    if msg.v != VERSION:
        raise MalformedDocumentError(f"{kind} message version {msg.v}, this reader knows {VERSION}")
    claimed = getattr(msg, "device_id", device_id)
    if device_id is not None and claimed != device_id:
        raise MalformedDocumentError(
            f"{kind} message names device {claimed!r} but came on {device_id!r}'s topic"
        )
    if isinstance(msg, Event):
        _check_event(msg, "event")
    elif isinstance(msg, Health):
        for m in msg.models:
            if m.last_event is not None:
                _check_event(m.last_event, f"model {m.name!r} last_event")
    return msg


def _check_event(ev: Event | LastEvent, what: str) -> None:
    """The checks an event and a health message's ``last_event`` share: a known kind and reason."""
    if ev.kind not in EVENT_KINDS:
        raise MalformedDocumentError(f"{what} kind {ev.kind!r} is not one of {EVENT_KINDS}")
    if ev.reason is not None and ev.reason not in REASON_CODES:
        raise MalformedDocumentError(f"{what} reason {ev.reason!r} is not a known code")


EventKind = Literal[
    "download_started", "verified", "staged", "smoke_passed",
    "activated", "committed", "rolled_back", "failed",
]
