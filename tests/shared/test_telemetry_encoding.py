"""Telemetry encodings (v1): JSON objects and positional MessagePack arrays, told apart by
their first byte; the strict MessagePack reader's refusals; the documented field order."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import msgspec
import pytest

from shared import strictmsgpack
from shared.errors import MalformedDocumentError
from shared.telemetry import messages

DOCS = Path(__file__).resolve().parents[2] / "docs" / "telemetry.md"


def _health(**kw: object) -> messages.Health:
    model = messages.ModelHealth(
        name="detector", release=12, version="2.3.0", state="committed", inferences=412, errors=1,
        total_inferences=90211, total_errors=3, latency_p50_ms=4.1, latency_p95_ms=7.9,
        drift=0.31, drift_inputs={"image": 0.31, "mask": 0.02})
    doc: dict[str, object] = dict(
        v=1, device_id="edge-01", seq=1207, ts=1795000010.5, interval_s=60.0, models=[model],
        cpu_percent=0.3, mem_rss_mb=93.71, mem_percent=31.2, disk_free_mb=51200.3, temperature_c=None,
        uptime_s=86400.5, dropped=2, dropped_health=2, spooled=5, device_cpu_percent=4.1)
    doc.update(kw)
    return messages.Health(**doc)  # type: ignore[arg-type]


ALL = {
    "health": _health(),
    "health-idle": _health(models=[]),
    "event": messages.Event(v=1, device_id="edge-01", seq=1210, ts=1795000012.0, model="detector",
                            kind="failed", release=13, from_release=12, reason="smoke_test",
                            message="output 'boxes' differs"),
    "status": messages.Status(v=1, device_id="edge-01", online=True, ts=1795000000.5,
                              agent_version="0.1.0", seq=1200),
    "desired": messages.DesiredNotice(v=1, generation=42, ts=1795000020.0),
}


@pytest.mark.parametrize("encoding", messages.ENCODINGS)
@pytest.mark.parametrize("name", sorted(ALL))
def test_round_trip_and_detection(name: str, encoding: messages.Encoding) -> None:
    msg = ALL[name]
    payload = messages.encode(msg, encoding)
    assert messages.detect(payload) == encoding
    assert messages.decode(name.split("-")[0], payload) == msg


def test_json_is_the_default_and_unchanged() -> None:
    msg = ALL["event"]
    assert messages.encode(msg) == msgspec.json.encode(msg)
    assert json.loads(messages.encode(msg))["reason"] == "smoke_test"


def test_msgpack_is_positional_in_field_order_and_smaller() -> None:
    msg = _health()
    arr = msgspec.msgpack.decode(messages.encode(msg, "msgpack"))
    assert arr[0] == 1 and arr[1] == "edge-01" and arr[2] == 1207  # v, device_id, seq
    assert arr[5][0][:3] == ["detector", 12, "2.3.0"]  # models[0]: name, release, version
    assert arr[5][0][11] == {"image": 0.31, "mask": 0.02}  # drift_inputs stays a map
    assert len(arr) == len(messages.Health.__struct_fields__)
    assert len(messages.encode(msg, "msgpack")) < 0.4 * len(messages.encode(msg, "json"))


def test_a_third_party_msgpack_map_with_field_names_is_read_too() -> None:
    msg = _health()
    by_name = msgspec.msgpack.encode(msgspec.to_builtins(msg))
    assert by_name[0] & 0xF0 == 0x80 or by_name[0] in (0xDE, 0xDF)
    assert messages.decode("health", by_name) == msg


def test_arrays_of_newer_and_older_agents() -> None:
    arr = msgspec.msgpack.decode(messages.encode(_health(), "msgpack"))
    # A newer agent appended fields (to Health and to each model): ignored.
    newer = [*arr[:5], [[*arr[5][0], "a-later-field", 0.5]], *arr[6:], 99, "extra"]
    assert messages.decode("health", msgspec.msgpack.encode(newer)) == _health()
    # An older agent had no spool counters nor device CPU: they take their defaults.
    older = arr[:13]
    got = messages.decode("health", msgspec.msgpack.encode(older))
    assert isinstance(got, messages.Health)
    assert (got.dropped, got.dropped_health, got.spooled, got.device_cpu_percent) == (2, 0, 0, None)


def test_decode_checks_apply_to_msgpack() -> None:
    payload = messages.encode(_health(), "msgpack")
    with pytest.raises(MalformedDocumentError, match="names device 'edge-01' but came on 'other'"):
        messages.decode("health", payload, device_id="other")
    bad_kind = msgspec.msgpack.encode([1, "edge-01", 3, 1.0, "detector", "exploded", 2])
    with pytest.raises(MalformedDocumentError, match="event kind 'exploded'"):
        messages.decode("event", bad_kind)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "empty telemetry payload"),
        (b"\x01\x02", "starts with byte 0x01: neither a JSON object nor a MessagePack"),
        (b"\xa5hello", "starts with byte 0xa5"),  # a bare string
        (msgspec.msgpack.encode([2, "edge-01", 1, 1.0]), "health message version 2, this reader knows 1"),
        (msgspec.msgpack.encode({"v": 3}), "version 3"),
        (msgspec.msgpack.encode([1, "edge-01", "seven", 1.0, 60.0, [], 0.0, 0.0, 0.0, 0.0]),
         r"health message is invalid: Expected `int`, got `str` - at `\$.seq`"),
        (msgspec.msgpack.encode([1, "edge-01", 7]), "missing required field `ts`"),
        (messages.encode(_health(), "msgpack") + b"\x00", "1 bytes after the end of the value"),
        (messages.encode(_health(), "msgpack")[:40], "truncated"),
        (b"\x81\xa1v\xcb" + struct.pack(">d", float("nan")), "number nan is out of range"),
        (b"\x91\xca" + struct.pack(">f", float("inf")), "number inf is out of range"),
        (b"\x82\xa1v\x01\xa1v\x01", "duplicate MessagePack key 'v'"),
        (b"\x81\x01\x01", "a map key is not a string"),
        (b"\x91\xd4\x01\x00", "type byte 0xd4 is not allowed"),  # fixext
        (b"\x91\xc1", "type byte 0xc1 is not allowed"),
        (b"\x91" * 40 + b"\x01", "nested deeper than 32"),
        (b"\xdc" + struct.pack(">H", 40000) + b"\x01" * 40000 * 2, "more than the 65536 allowed"),
        (b"\x91\xa2\xff\xfe", "not valid MessagePack"),  # a str that is not UTF-8
    ],
)
def test_msgpack_refusals(payload: bytes, match: str) -> None:
    with pytest.raises(MalformedDocumentError, match=match):
        messages.decode("health", payload)


def test_strictmsgpack_scans_every_type() -> None:
    doc = {"nil": None, "t": True, "f": False, "i": [0, 127, -1, -32, 255, -128, 65535, -32768, 2**32 - 1,
           -(2**31), 2**64 - 1, -(2**63)], "fl": 1.5, "s": "x" * 40, "long": "y" * 300,
           "bin": b"\x00\x01", "nested": {"a": [{"b": {}}]}, "big": list(range(20))}
    assert strictmsgpack.loads(msgspec.msgpack.encode(doc)) == doc


def test_encode_refuses_an_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="unknown telemetry encoding 'cbor'"):
        messages.encode(ALL["event"], "cbor")  # type: ignore[arg-type]


def test_documented_field_order_is_the_code_s() -> None:
    """docs/telemetry.md lists each positional layout; the code may only append to it."""
    text = DOCS.read_text()
    layouts = dict(re.findall(r"^\| `(\w+)` array \| (.+?) \|$", text, re.M))
    assert {"Health", "ModelHealth", "Event", "Status", "DesiredNotice"} <= set(layouts)
    for name, fields in layouts.items():
        cls = getattr(messages, name)
        documented = [f.strip().strip("`") for f in fields.split(",")]
        assert list(cls.__struct_fields__[: len(documented)]) == documented, name
