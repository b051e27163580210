"""[mqtt] encoding: MessagePack by default, JSON where an operator asks, anything else named;
the keepalive default (the ping period) above the health interval."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config

BASE = {"state_dir": "/s", "trust_root": "/r.json", "device_id": "d"}


def test_defaults() -> None:
    cfg = parse_config({**BASE, "mqtt": {"url": "mqtt://b:1883"}})
    assert cfg.mqtt.encoding == "msgpack"
    # paho pings every keepalive whatever else flows; health (60 s) is the liveness signal.
    assert cfg.mqtt.keepalive_s == 300 and cfg.mqtt.keepalive_s > cfg.mqtt.health_interval_s
    assert parse_config(BASE).mqtt.encoding == "msgpack"


def test_json_on_request() -> None:
    cfg = parse_config({**BASE, "mqtt": {"url": "mqtt://b:1883", "encoding": "json"}})
    assert cfg.mqtt.encoding == "json"


@pytest.mark.parametrize(("value", "named"), [
    ("cbor", "mqtt.encoding = 'cbor' must be one of json, msgpack"),
    ("JSON", "mqtt.encoding = 'JSON' must be one of json, msgpack"),
    (1, "mqtt.encoding = 1 must be a str"),
])
def test_bad_encoding_is_named(value: object, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "mqtt": {"url": "mqtt://b:1883", "encoding": value}})
    assert named in str(err.value)
