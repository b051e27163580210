"""The fast paths of the strict readers (strictjson, strictmsgpack, telemetry decode) accept
only what the strict paths accept: what msgspec itself writes goes fast, everything else
through the slow path, which gives the same precise refusals as before."""

from __future__ import annotations

import struct

import msgspec
import pytest

from shared import strictjson, strictmsgpack
from shared.errors import MalformedDocumentError
from shared.telemetry import messages


def _health(**kw: object) -> messages.Health:
    model = messages.ModelHealth(
        name="detector", release=12, version="2.3.0", state="committed", inferences=412, errors=1,
        total_inferences=90211, total_errors=3, latency_p50_ms=4.1, latency_p95_ms=7.9,
        drift=0.31, drift_inputs={"aa": 0.31, "bb": 0.02})
    doc: dict[str, object] = dict(
        v=1, device_id="edge-01", seq=1207, ts=1795000010.5, interval_s=60.0, models=[model],
        cpu_percent=0.3, mem_rss_mb=93.71, mem_percent=31.2, disk_free_mb=51200.3, uptime_s=86400.5)
    doc.update(kw)
    return messages.Health(**doc)  # type: ignore[arg-type]


# -- telemetry: payloads that are msgspec's own encoding except for one planted flaw -------------


@pytest.mark.parametrize("encoding", messages.ENCODINGS)
def test_a_duplicate_key_in_a_known_map_is_refused(encoding: messages.Encoding) -> None:
    key = b'"bb"' if encoding == "json" else b"\xa2bb"
    payload = messages.encode(_health(), encoding).replace(key, key.replace(b"bb", b"aa"))
    with pytest.raises(MalformedDocumentError, match=r"duplicate (JSON|MessagePack) key 'aa'"):
        messages.decode("health", payload)


def test_a_duplicate_json_field_is_refused() -> None:
    payload = messages.encode(_health()).replace(b'"mem_percent"', b'"mem_rss_mb"')
    with pytest.raises(MalformedDocumentError, match="duplicate JSON key 'mem_rss_mb'"):
        messages.decode("health", payload)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_msgpack_non_finite_floats_are_refused(value: float) -> None:
    for msg in (_health(cpu_percent=value), _health(temperature_c=value)):
        with pytest.raises(MalformedDocumentError, match="out of range"):
            messages.decode("health", messages.encode(msg, "msgpack"))
    drift = _health()
    drift.models[0].drift_inputs = {"aa": value}
    with pytest.raises(MalformedDocumentError, match="out of range"):
        messages.decode("health", messages.encode(drift, "msgpack"))


def test_json_number_out_of_range_is_refused() -> None:
    payload = messages.encode(_health()).replace(b'"cpu_percent":0.3', b'"cpu_percent":1e999')
    with pytest.raises(MalformedDocumentError, match="JSON number 1e999 is out of range"):
        messages.decode("health", payload)


def test_unknown_trailing_fields_are_ignored_but_still_strict() -> None:
    arr = msgspec.msgpack.decode(messages.encode(_health(), "msgpack"))
    assert messages.decode("health", msgspec.msgpack.encode([*arr, {"x": 1.5}])) == _health()
    with pytest.raises(MalformedDocumentError, match="number nan is out of range"):
        messages.decode("health", msgspec.msgpack.encode([*arr, [float("nan")]]))
    dup = msgspec.msgpack.encode([*arr, {"xx": 1, "yy": 2}]).replace(b"\xa2yy", b"\xa2xx")
    with pytest.raises(MalformedDocumentError, match="duplicate MessagePack key 'xx'"):
        messages.decode("health", dup)
    doc = msgspec.json.encode(_health())[:-1] + b',"later":{"k":1,"k":2}}'
    with pytest.raises(MalformedDocumentError, match="duplicate JSON key 'k'"):
        messages.decode("health", doc)
    assert messages.decode("health", doc.replace(b'"k":2', b'"j":2')) == _health()


@pytest.mark.parametrize("encoding", messages.ENCODINGS)
def test_other_encoders_take_the_strict_path_and_are_accepted(encoding: messages.Encoding) -> None:
    msg = _health(cpu_percent=3.0)
    if encoding == "json":  # spaces, and an int where a float is declared
        import json

        text = json.dumps(msgspec.to_builtins(msg))
        payload = text.replace('"cpu_percent": 3.0', '"cpu_percent": 3').encode()
    else:  # float32 instead of float64, and an int for a float
        payload = messages.encode(msg, "msgpack").replace(b"\xcb" + struct.pack(">d", 3.0), b"\x03")
    assert messages._decode_fast(messages.Health, payload, encoding) is None
    assert messages.decode("health", payload) == msg


def test_oversize_is_refused_before_any_decoding() -> None:
    big = _health(device_id="x" * messages.MAX_MESSAGE_BYTES)
    for encoding in messages.ENCODINGS:
        with pytest.raises(MalformedDocumentError, match="more than the 65536 allowed"):
            messages.decode("health", messages.encode(big, encoding))


# -- the readers on their own ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"a":1,"a":2}', "duplicate JSON key 'a'"),
        (b'{"a":1,"\\u0061":2}', "duplicate JSON key 'a'"),
        (b'{"a":{"b":1,"b":1}}', "duplicate JSON key 'b'"),
        (b"[1e999]", "JSON number 1e999 is out of range"),
        (b"[-1e999]", "out of range"),
        (b'{"a":NaN}', "JSON constant NaN is not allowed"),
        (b"[Infinity]", "JSON constant Infinity is not allowed"),
        (b"[1] x", "not valid JSON"),
    ],
)
def test_strictjson_refusals(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedDocumentError, match=match):
        strictjson.loads(raw)


def test_strictjson_accepts_both_forms_alike() -> None:
    doc = {"a": [1, 2.5, None, True, "é"], "b": {"c": -0.0, "d": 10**30}}
    spaced = b'{"a": [1, 2.5, null, true, "\\u00e9"], "b": {"c": -0.0, "d": 1' + b"0" * 30 + b"}}"
    assert strictjson.loads(msgspec.json.encode(doc)) == strictjson.loads(spaced) == doc


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (msgspec.msgpack.encode({"a": [1, {"b": float("nan")}]}), "number nan is out of range"),
        (msgspec.msgpack.encode([float("-inf")]), "number -inf is out of range"),
        (msgspec.msgpack.encode({1: "x"}), "a map key is not a string"),
        (msgspec.msgpack.encode({b"k": "x"}), "a map key is not a string"),
        (msgspec.msgpack.encode([msgspec.msgpack.Ext(1, b"x")]), "type byte 0xd4 is not allowed"),
        (b"\x91\xd6\xff" + struct.pack(">I", 0), "type byte 0xd6 is not allowed"),  # timestamp ext
        (_nested(33), "nested deeper than 32"),
        (msgspec.msgpack.encode({"k": 1, "l": 2}).replace(b"\xa1l", b"\xa1k"),
         "duplicate MessagePack key 'k'"),
    ],
)
def test_strictmsgpack_refusals_of_canonical_bytes(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedDocumentError, match=match):
        strictmsgpack.loads(raw)


def test_strictmsgpack_depth_bound_is_the_scan_s() -> None:
    assert strictmsgpack.loads(_nested(32)) is not None
    assert strictmsgpack.loads(b"\x91" * 32 + b"\x90") is not None  # an empty array at depth 32
    doc = {"bin": b"\x00\x01", "f": 1.5, "t": True, "n": None, "s": "é", "l": [{"m": {}}]}
    assert strictmsgpack.loads(msgspec.msgpack.encode(doc)) == doc
