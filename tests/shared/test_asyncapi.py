"""docs/asyncapi.json is what shared.contract.asyncapi makes of the message types, and its
schemas accept what the reader (messages.decode) accepts and refuse what it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from shared.contract import asyncapi
from shared.errors import MalformedDocumentError
from shared.telemetry import messages

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_checked_in_contract_is_generated_from_the_types() -> None:
    assert CHECKED_IN.read_text() == asyncapi.render(), (
        "docs/asyncapi.json is stale: run python -m shared.contract.asyncapi docs/asyncapi.json")


def validator(name: str) -> jsonschema.Draft7Validator:
    doc = json.loads(CHECKED_IN.read_text())
    return jsonschema.Draft7Validator({"$ref": f"#/components/schemas/{name}",
                                       "components": doc["components"]})


HEALTH = messages.Health(
    v=1, device_id="d-1", seq=7, ts=1.7e9, interval_s=30.0, cpu_percent=3.5, mem_rss_mb=80.0,
    mem_percent=2.0, disk_free_mb=900.0, session="s1",
    models=[messages.ModelHealth(
        name="clf", release=3, version="1.3", state="committed", inferences=10, errors=1,
        total_inferences=100, total_errors=2, latency_p95_ms=4.5, drift_inputs={"x": 0.1},
        held=[2, 3], shadow=messages.ShadowHealth(release=4, samples=5, agreement=0.8),
        last_event=messages.LastEvent(seq=5, ts=1.7e9, kind="rolled_back", release=3,
                                      from_release=4, reason="trial_errors"))])
EVENT = messages.Event(v=1, device_id="d-1", seq=8, ts=1.7e9, model="clf", kind="failed", release=4,
                       reason="hash", message="blob x: hash differs")


@pytest.mark.parametrize("message", [HEALTH, EVENT], ids=["health", "event"])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_both_encodings_of_a_full_message_validate(message: Any, encoding: messages.Encoding) -> None:
    payload = messages.encode(message, encoding)
    doc = json.loads(payload) if encoding == "json" else msgspec.msgpack.decode(payload)
    name = type(message).__name__ + ("Array" if encoding == "msgpack" else "")
    assert list(validator(name).iter_errors(doc)) == []


@pytest.mark.parametrize(("change", "where"), [
    (lambda d: d.pop("seq"), "seq missing"),
    (lambda d: d.update(kind="exploded"), "unknown kind"),
    (lambda d: d.update(reason="because"), "unknown reason"),
    (lambda d: d.update(release="4"), "release as text"),
])
def test_the_schema_refuses_what_the_reader_refuses(change: Any, where: str) -> None:
    doc = msgspec.to_builtins(EVENT)
    change(doc)
    with pytest.raises(MalformedDocumentError):
        messages.decode("event", json.dumps(doc).encode())
    assert list(validator("Event").iter_errors(doc)), f"the schema took an event with {where}"


def test_a_short_msgpack_array_is_refused_by_both() -> None:
    doc = msgspec.msgpack.decode(messages.encode(EVENT, "msgpack"))[:5]
    with pytest.raises(MalformedDocumentError):
        messages.decode("event", msgspec.msgpack.encode(doc))
    assert list(validator("EventArray").iter_errors(doc))
