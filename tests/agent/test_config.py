"""The TOML config: typed, validated, unknown keys and bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

FULL = """
device_id = "dev-1"
state_dir = "state"
trust_root = "/etc/edgefleet/root.json"
[fleet]
url = "http://127.0.0.1:8080"
enrollment_token = "tok"
labels = { ring = "canary", site = "lab" }
poll_interval_s = 30
[mqtt]
url = "mqtt://127.0.0.1:1884"
health_interval_s = 10.0
keepalive_s = 60
[api]
listen = "127.0.0.1:0"
unix_socket = "/run/edgefleet/api.sock"
max_body_bytes = 1024
[runtime]
intra_op_threads = 2
[update]
trial_seconds = 0
trial_max_error_rate = 0.25
trial_min_inferences = 10
"""


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(FULL)
    cfg = load_config(path)
    assert cfg.device_id == "dev-1"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.fleet is not None and cfg.fleet.labels == {"ring": "canary", "site": "lab"}
    assert cfg.fleet.poll_interval_s == 30.0 and isinstance(cfg.fleet.poll_interval_s, float)
    assert cfg.mqtt.url == "mqtt://127.0.0.1:1884" and cfg.mqtt_enabled
    assert cfg.api.tcp_address == ("127.0.0.1", 0) and cfg.api.max_body_bytes == 1024
    assert cfg.runtime.intra_op_threads == 2
    assert cfg.update.trial_seconds == 0 and cfg.update.trial_min_inferences == 10


def test_api_limits() -> None:
    api = parse_config({"state_dir": "/s", "trust_root": "/r.json", "api": {
        "max_json_bytes": 1 << 20, "max_inflight_bytes": 1 << 27, "max_connections": 64, "workers": 4,
        "max_queued": 8, "backlog": 16, "idle_timeout_s": 5, "head_timeout_s": 2, "io_timeout_s": 3}}).api
    assert (api.max_json_bytes, api.max_inflight_bytes) == (1 << 20, 1 << 27)
    assert (api.max_connections, api.workers, api.max_queued, api.backlog) == (64, 4, 8, 16)
    assert (api.idle_timeout_s, api.head_timeout_s, api.io_timeout_s) == (5.0, 2.0, 3.0)


def test_trial_latency_ratio_default_and_off() -> None:
    base = {"state_dir": "/s", "trust_root": "/r.json"}
    assert parse_config(base).update.trial_max_latency_ratio == 2.0
    off = parse_config({**base, "update": {"trial_max_latency_ratio": 0}})
    assert off.update.trial_max_latency_ratio == 0  # agent.main passes None: not judged


def test_offline_minimum() -> None:
    cfg = parse_config({"state_dir": "/s", "trust_root": "/r.json"})
    assert cfg.fleet is None and cfg.device_id is None and not cfg.mqtt_enabled
    assert cfg.api.listen == "127.0.0.1:8181"


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"trust_root": "/r"}, "state_dir is required"),
        ({"state_dir": "/s"}, "trust_root is required"),
        ({"colour": "red"}, "colour = 'red'"),
        ({"api": {"listen": "127.0.0.1:0", "lisen": "x"}}, "api.lisen = 'x'"),
        ({"api": {"listen": "localhost"}}, "api.listen = 'localhost'"),
        ({"api": {"max_body_bytes": -1}}, "api.max_body_bytes = -1"),
        ({"api": {"max_body_bytes": "big"}}, "api.max_body_bytes = 'big'"),
        ({"api": {"workers": 0}}, "api.workers = 0 must be > 0"),
        ({"api": {"head_timeout_s": -1}}, "api.head_timeout_s = -1"),
        ({"api": {"max_body_bytes": 1 << 30}}, "api.max_inflight_bytes = 134217728 must be at least"),
        ({"runtime": {"intra_op_threads": True}}, "runtime.intra_op_threads = True"),
        ({"update": {"trial_max_error_rate": 1.5}}, "update.trial_max_error_rate = 1.5"),
        ({"update": {"trial_max_latency_ratio": -1.0}}, "update.trial_max_latency_ratio = -1.0 must be >= 0"),
        ({"device_id": "a/b"}, "device_id = 'a/b'"),
        ({"fleet": {"url": "http://f"}}, "device_id is required"),
        ({"device_id": "d", "fleet": {"url": "ftp://f"}}, "fleet.url = 'ftp://f'"),
        ({"device_id": "d", "fleet": {"url": "http://f", "labels": {"a": 1}}}, "fleet.labels.a = 1"),
        ({"device_id": "d", "mqtt": {"url": "tcp://b:1"}}, "mqtt.url = 'tcp://b:1'"),
        ({"device_id": "d", "mqtt": {"health_interval_s": 1}}, "mqtt.url is required"),
        ({"fleet": "yes"}, "fleet = 'yes'"),
    ],
)
def test_bad_values_are_named(doc: dict, named: str) -> None:
    base = {"state_dir": "/s", "trust_root": "/r.json"}
    base = {k: v for k, v in base.items() if not (k in ("state_dir", "trust_root") and "required" in named
                                                   and named.startswith(k))}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, **doc})
    assert named in str(err.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("state_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
