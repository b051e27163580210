"""A third-party subscriber written from docs/asyncapi.json alone reads real agents' messages.

``SchemaSubscriber`` imports nothing of edgefleet: it takes the topics from the channel
addresses, picks each message's form by its MQTT 5 content-type, decodes it with a generic
JSON or MessagePack decoder and validates it against the checked-in schema. Two real agents
enroll with the real fleet over real Mosquitto, install and commit a release, serve traffic;
every message on the edgefleet topics, the agents' and the fleet's, must validate and carry
the content type its channel declares.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import msgspec  # as a generic MessagePack decoder only
import paho.mqtt.client as mqtt

from fleet.db.engine import session_scope
from fleet.demo.models import write_classifier
from fleet.rollout.assignments import set_assignment

from ..waiting import wait_for
from .rollout_rig import DEVICES, Rig, running_rig

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


class SchemaSubscriber:
    """Every channel of the contract, for every device ('+'), checked against its schemas."""

    def __init__(self, contract: dict[str, Any], host: str, port: int) -> None:
        self.contract = contract
        self.channels = []  # (topic regex, channel name, its messages)
        for name, channel in contract["channels"].items():
            pattern = re.escape(channel["address"]).replace(re.escape("{device_id}"), "([^/]+)")
            forms = [self._resolve(ref["$ref"]) for ref in channel["messages"].values()]
            self.channels.append((re.compile(pattern + r"\Z"), name, forms))
        self.lock = threading.Lock()
        self.valid: list[tuple[str, str, Any, str | None]] = []  # (channel, device, doc, ctype)
        self.invalid: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.subscribed.wait(15), "the subscriber did not subscribe"

    def _resolve(self, ref: str) -> Any:
        node: Any = self.contract
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return node

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        # the common prefix of every address, one level for the device, one for the kind
        prefix = "/".join(next(iter(self.contract["channels"].values()))["address"].split("/")[:3])
        client.subscribe(f"{prefix}/+/+", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            try:
                self.valid.append(self._check(msg))
            except (ValueError, jsonschema.ValidationError, msgspec.DecodeError) as exc:
                self.invalid.append(f"{msg.topic}: {exc}")

    def _check(self, msg: mqtt.MQTTMessage) -> tuple[str, str, Any, str | None]:
        found = next(((p.match(msg.topic), name, forms) for p, name, forms in self.channels
                      if p.match(msg.topic)), None)
        if found is None:
            raise ValueError("a topic of no channel")
        match, name, forms = found
        assert match is not None
        props = getattr(msg, "properties", None)
        ctype = getattr(props, "ContentType", None) if props is not None else None
        # without the MQTT 5 property: JSON starts with '{', anything else is MessagePack
        wanted = ctype or ("application/json" if msg.payload[:1] == b"{" else "application/msgpack")
        form = next((f for f in forms if f["contentType"] == wanted), None)
        if form is None:
            raise ValueError(f"content type {wanted} is not one of channel {name}'s")
        doc = json.loads(msg.payload) if wanted == "application/json" else msgspec.msgpack.decode(msg.payload)
        schema = {"$ref": form["payload"]["$ref"], "components": self.contract["components"]}
        jsonschema.Draft7Validator(schema).validate(doc)
        return name, match.group(1), doc, ctype

    def seen(self, channel: str, device: str | None = None, pred: Any = lambda doc: True) -> bool:
        with self.lock:
            return any(c == channel and (device is None or d == device) and pred(doc)
                       for c, d, doc, _ in self.valid)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def assign_r1(rig: Rig) -> None:
    """Release 1 to every device, and the fleet's desired-state notices published as its
    controller publishes them (after the transaction)."""
    bundle_id = rig.upload(1, lambda p: write_classifier(p, seed=0))
    ctx = rig.app.state.ctx
    with session_scope(ctx.engine) as session:
        notices = [set_assignment(session, d, "clf", bundle_id, None) for d in DEVICES]
    ctx.controller.notify([n for n in notices if n])


def _models(doc: Any) -> list[Any]:
    """The models of a health message in either form (object: "models", array: 6th element)."""
    return doc["models"] if isinstance(doc, dict) else doc[5]


def test_a_subscriber_from_the_schema_alone_validates_real_agent_messages(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    contract = json.loads(CONTRACT.read_text())
    sub = SchemaSubscriber(contract, "127.0.0.1", mosquitto.port)
    try:
        with running_rig(tmp_path, mosquitto, traffic_pause_s=0.05) as rig:
            assign_r1(rig)
            for device in DEVICES:
                for channel, pred in (("desired", None), ("status", None), ("event", None),
                                      ("health", lambda doc: len(_models(doc)) == 1)):
                    wait_for(lambda c=channel, d=device, p=pred: sub.seen(c, d, p or (lambda doc: True)),
                             timeout=30, what=f"a valid {channel} message of {device} ({sub.invalid})")
        wait_for(lambda: sub.seen("status", DEVICES[0], lambda doc: doc["online"] is False),
                 timeout=15, what="the death message of a stopped agent")
    finally:
        sub.close()
    assert sub.invalid == []
    with sub.lock:
        seen = [(c, ctype) for c, _d, _doc, ctype in sub.valid]
    assert all(ctype is not None for _c, ctype in seen), "a message without content-type"
    # the agents' default encoding: health and events in MessagePack, status in JSON; the
    # fleet's desired notices in JSON
    assert {c: ctype for c, ctype in seen} == {
        "status": "application/json", "health": "application/msgpack", "event": "application/msgpack",
        "desired": "application/json"}
