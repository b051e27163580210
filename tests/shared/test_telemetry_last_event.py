"""ModelHealth.last_event (v1, appended): each model's latest lifecycle event in every health
message, so a reader that missed the event recovers it. Round trips in both encodings, older
agents' health without it, and the event checks applied to it."""

from __future__ import annotations

import msgspec
import pytest

from shared.errors import MalformedDocumentError
from shared.telemetry import messages

ROLLED_BACK = messages.LastEvent(seq=383, ts=1795000012.25, kind="rolled_back", release=12,
                                 from_release=13, reason="trial_errors")


def _health(last_event: messages.LastEvent | None) -> messages.Health:
    model = messages.ModelHealth(
        name="detector", release=12, version="2.3.0", state="rolled_back", inferences=4, errors=3,
        total_inferences=90, total_errors=30, latency_p50_ms=4.1, latency_p95_ms=7.9,
        held=[12, 13], last_event=last_event)
    return messages.Health(v=1, device_id="edge-01", seq=390, ts=1795000020.5, interval_s=10.0,
                           models=[model], cpu_percent=1.0, mem_rss_mb=50.0, mem_percent=3.0,
                           disk_free_mb=100.0)


@pytest.mark.parametrize("encoding", messages.ENCODINGS)
@pytest.mark.parametrize("last_event", [
    None,
    ROLLED_BACK,
    messages.LastEvent(seq=7, ts=1.5, kind="committed", release=3),  # optional fields left out
])
def test_round_trip(encoding: messages.Encoding, last_event: messages.LastEvent | None) -> None:
    msg = _health(last_event)
    got = messages.decode("health", messages.encode(msg, encoding), device_id="edge-01")
    assert got == msg
    assert isinstance(got, messages.Health) and got.models[0].last_event == last_event


def test_msgpack_layout_is_appended_and_positional() -> None:
    arr = msgspec.msgpack.decode(messages.encode(_health(ROLLED_BACK), "msgpack"))
    model = arr[5][0]
    assert messages.ModelHealth.__struct_fields__[-1] == "last_event"
    assert len(model) == len(messages.ModelHealth.__struct_fields__)
    assert model[-1] == [383, 1795000012.25, "rolled_back", 12, 13, "trial_errors"]


def test_json_has_field_names() -> None:
    doc = msgspec.json.decode(messages.encode(_health(ROLLED_BACK), "json"))
    assert doc["models"][0]["last_event"] == {
        "seq": 383, "ts": 1795000012.25, "kind": "rolled_back", "release": 12, "from_release": 13,
        "reason": "trial_errors"}


def test_an_older_agent_s_health_without_it_still_decodes() -> None:
    # msgpack: the model array one element shorter (no last_event): the default, None.
    arr = msgspec.msgpack.decode(messages.encode(_health(None), "msgpack"))
    arr[5][0] = arr[5][0][:-1]
    got = messages.decode("health", msgspec.msgpack.encode(arr))
    assert isinstance(got, messages.Health) and got.models[0].last_event is None
    assert got == _health(None)
    # JSON: the key absent.
    doc = msgspec.json.decode(messages.encode(_health(None), "json"))
    del doc["models"][0]["last_event"]
    got = messages.decode("health", msgspec.json.encode(doc))
    assert isinstance(got, messages.Health) and got.models[0].last_event is None


def test_a_newer_agent_s_extra_last_event_fields_are_ignored() -> None:
    arr = msgspec.msgpack.decode(messages.encode(_health(ROLLED_BACK), "msgpack"))
    arr[5][0][-1] = [*arr[5][0][-1], "a-later-field"]
    assert messages.decode("health", msgspec.msgpack.encode(arr)) == _health(ROLLED_BACK)


def _with_last_event(doc: object, encoding: messages.Encoding) -> bytes:
    msg = msgspec.to_builtins(_health(None))
    msg["models"][0]["last_event"] = doc
    if encoding == "json":
        return msgspec.json.encode(msg)
    arr = msgspec.msgpack.decode(messages.encode(_health(None), "msgpack"))
    arr[5][0][-1] = list(doc.values()) if isinstance(doc, dict) else doc
    return msgspec.msgpack.encode(arr)


GOOD = {"seq": 383, "ts": 1.5, "kind": "rolled_back", "release": 12, "from_release": 13,
        "reason": "trial_errors"}


BAD = [
    ({**GOOD, "kind": "exploded"}, "model 'detector' last_event kind 'exploded' is not one of"),
    ({**GOOD, "reason": "bad_luck"}, "model 'detector' last_event reason 'bad_luck' is not a known code"),
    ({**GOOD, "seq": "383"}, "Expected `int`, got `str`"),
    ({**GOOD, "release": 1.5}, "Expected `int`, got `float`"),
    ("rolled_back", "Expected"),
]


@pytest.mark.parametrize(("encoding", "doc", "fragment"), [
    *((e, doc, fragment) for e in messages.ENCODINGS for doc, fragment in BAD),
    # JSON only: a positional array has no form for a missing middle field
    ("json", {k: v for k, v in GOOD.items() if k != "kind"}, "missing required field `kind`"),
])
def test_a_bad_last_event_is_refused(encoding: messages.Encoding, doc: object, fragment: str) -> None:
    with pytest.raises(MalformedDocumentError) as info:
        messages.decode("health", _with_last_event(doc, encoding), device_id="edge-01")
    assert fragment in str(info.value)


def test_a_good_last_event_built_by_hand_is_accepted() -> None:
    for encoding in messages.ENCODINGS:
        got = messages.decode("health", _with_last_event(GOOD, encoding))  # type: ignore[arg-type]
        assert isinstance(got, messages.Health)
        assert got.models[0].last_event == messages.LastEvent(**GOOD)  # type: ignore[arg-type]
