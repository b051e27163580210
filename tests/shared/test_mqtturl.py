"""One broker URL grammar: the agent's config and reporter and the fleet's settings read a URL
the same way, and refuse the same URLs with the same named error."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.telemetry.connection import parse_mqtt_url as agent_parse
from fleet.broker.client import parse_mqtt_url as fleet_parse
from shared.mqtturl import BadMqttUrl, MqttUrl, parse_mqtt_url


@pytest.mark.parametrize(("url", "want"), [
    ("mqtt://b", MqttUrl("b", 1883, False)),
    ("mqtts://b", MqttUrl("b", 8883, True)),
    ("mqtt://b:1884", MqttUrl("b", 1884, False)),
    ("mqtts://u%40x:p%3Aw@b:9", MqttUrl("b", 9, True, "u@x", "p:w")),
    ("mqtt://[::1]:1883", MqttUrl("::1", 1883, False)),
])
def test_the_agent_and_the_fleet_read_a_url_alike(url: str, want: MqttUrl) -> None:
    assert parse_mqtt_url(url) == want
    assert agent_parse(url) == want
    target = fleet_parse(url)
    assert (target.host, target.port, target.tls, target.username, target.password) == (
        want.host, want.port, want.tls, want.username, want.password)


@pytest.mark.parametrize(("url", "problem"), [
    ("http://b", "must be a URL"),
    ("tcp://b", "must be a URL"),
    ("mqtt://", "must be a URL"),
    ("mqtt://b:99999", "bad port"),
    ("mqtt://b:x", "bad port"),
])
def test_a_url_off_the_grammar_is_refused_alike(url: str, problem: str) -> None:
    for parse in (parse_mqtt_url, agent_parse, fleet_parse):
        with pytest.raises(BadMqttUrl, match=problem) as err:
            parse(url)
        assert err.value.url == url
    with pytest.raises(ConfigError, match=f"mqtt.url = '{url}' .*{problem}"):
        parse_config({"device_id": "d", "state_dir": "/s", "trust_root": "/r.json", "mqtt": {"url": url}})
