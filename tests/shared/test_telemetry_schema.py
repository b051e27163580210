"""MQTT topic layout and message schema (v1): round trips and refusals."""

from __future__ import annotations

import json
import re

import pytest

from shared.errors import MalformedDocumentError
from shared.telemetry import messages, topics


@pytest.mark.parametrize("kind", topics.KINDS)
@pytest.mark.parametrize("device_id", ["cam-01", "a", "Rpi4.lab_2", "x" * 64])
def test_topic_round_trip(device_id: str, kind: str) -> None:
    name = topics.topic(device_id, kind)
    assert name == f"edgefleet/v1/devices/{device_id}/{kind}"
    assert topics.parse_topic(name) == (device_id, kind)


def test_subscription_is_a_single_level_wildcard() -> None:
    assert topics.subscription("health") == "edgefleet/v1/devices/+/health"


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", "", "-lead", "x" * 65, "dev\n", "dév", "a b"])
def test_topic_refuses_bad_device_id(device_id: str) -> None:
    with pytest.raises(MalformedDocumentError, match=re.escape(f"device id {device_id!r} must match")):
        topics.topic(device_id, "health")


def test_topic_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"unknown topic kind 'metrics'"):
        topics.topic("cam-01", "metrics")


@pytest.mark.parametrize(
    "name",
    [
        "edgefleet/v1/devices/+/health",
        "edgefleet/v1/devices/#",
        "edgefleet/v2/devices/cam-01/health",
        "other/v1/devices/cam-01/health",
        "edgefleet/v1/devices/cam-01/metrics",
        "edgefleet/v1/devices/cam-01/health/extra",
        "/edgefleet/v1/devices/cam-01/health",
        "edgefleet/v1/devices//health",
        "",
    ],
)
def test_parse_topic_refuses(name: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        topics.parse_topic(name)
    text = str(info.value)
    assert "is not on the edgefleet/v1 layout" in text or "must match" in text


def test_parse_topic_refuses_wildcard_device() -> None:
    with pytest.raises(MalformedDocumentError, match=r"device id '\+' must match"):
        topics.parse_topic("edgefleet/v1/devices/+/health")


# --- messages ------------------------------------------------------------------------


def _health(**overrides: object) -> dict:
    doc: dict = {
        "v": 1, "device_id": "cam-01", "seq": 7, "ts": 1700000000.5, "interval_s": 10.0,
        "models": [{"name": "detector", "release": 5, "version": "1.0", "state": "committed",
                    "inferences": 10, "errors": 0, "total_inferences": 100, "total_errors": 1,
                    "latency_p50_ms": 1.5, "latency_p95_ms": 4.0}],
        "cpu_percent": 12.5, "mem_rss_mb": 80.0, "mem_percent": 4.0, "disk_free_mb": 1000.0,
    }
    doc.update(overrides)
    return doc


def _event(**overrides: object) -> dict:
    doc: dict = {"v": 1, "device_id": "cam-01", "seq": 8, "ts": 1700000001.0, "model": "detector",
                 "kind": "failed", "release": 6, "from_release": 5, "reason": "hash", "message": "x"}
    doc.update(overrides)
    return doc


def _enc(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_health_round_trip() -> None:
    msg = messages.decode("health", _enc(_health()), device_id="cam-01")
    assert isinstance(msg, messages.Health)
    assert msg.models[0].total_inferences == 100
    assert messages.decode("health", messages.encode(msg), device_id="cam-01") == msg


def test_event_status_desired_round_trip() -> None:
    event = messages.decode("event", _enc(_event()), device_id="cam-01")
    assert isinstance(event, messages.Event) and event.reason == "hash"
    status = messages.Status(v=1, device_id="cam-01", online=False, ts=1.0)
    assert messages.decode("status", messages.encode(status), device_id="cam-01") == status
    notice = messages.DesiredNotice(v=1, generation=3, ts=2.0)
    assert messages.decode("desired", messages.encode(notice), device_id="cam-01") == notice


@pytest.mark.parametrize("kind", messages.EVENT_KINDS)
def test_every_event_kind_is_accepted(kind: str) -> None:
    assert messages.decode("event", _enc(_event(kind=kind, reason=None))).kind == kind


@pytest.mark.parametrize("reason", messages.REASON_CODES)
def test_every_reason_code_is_accepted(reason: str) -> None:
    assert messages.decode("event", _enc(_event(reason=reason))).reason == reason


@pytest.mark.parametrize(
    ("kind", "payload", "fragment"),
    [
        ("health", _enc(_health(v=2)), "health message version 2, this reader knows 1"),
        ("event", _enc(_event(v=0)), "event message version 0"),
        ("health", _enc(_health(device_id="cam-02")),
         "health message names device 'cam-02' but came on 'cam-01''s topic"),
        ("event", _enc(_event(kind="exploded")), "event kind 'exploded' is not one of"),
        ("event", _enc(_event(reason="bad_luck")), "event reason 'bad_luck' is not a known code"),
        ("metrics", b"{}", "unknown message kind 'metrics'"),
        ("health", b'{"v": 1, "v": 1}', "duplicate JSON key 'v'"),
        ("health", _enc(_health(seq="7")), "Expected `int`, got `str` - at `$.seq`"),
        ("health", b'{"v": 1, "cpu_percent": NaN}', "JSON constant NaN is not allowed"),
        ("health", b"{", "health message is not valid JSON"),
        ("status", _enc({"v": 1, "device_id": "cam-01", "ts": 1.0}), "missing required field `online`"),
        ("health", b" " * (messages.MAX_MESSAGE_BYTES + 1),
         f"health message is {messages.MAX_MESSAGE_BYTES + 1} bytes, more than the"),
    ],
)
def test_decode_refuses(kind: str, payload: bytes, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        messages.decode(kind, payload, device_id="cam-01")
    assert fragment in str(info.value)


def test_decode_without_topic_device_id_accepts_any_device() -> None:
    assert messages.decode("health", _enc(_health(device_id="other"))).device_id == "other"


def test_readers_ignore_fields_added_later() -> None:
    """A fleet older than its agents still reads their health (fields only get added in v1)."""
    from shared.telemetry.messages import Health, decode

    msg = decode("health", _enc(_health(gpu_percent=12.5)), device_id="cam-01")
    assert isinstance(msg, Health) and not hasattr(msg, "gpu_percent")
