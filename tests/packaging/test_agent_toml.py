"""packaging/config/agent.toml documents every key the agent reads (agent.config) and, for
each key it gives a value, that value is the real default: the config parsed with the value
equals the config parsed without it. Keys shown with an example instead of their default
are listed here, each with why; a value the file sets on purpose says "default X" beside it,
X the real default."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import agent.config as config_module
from agent.config import parse_config

SHIPPED = Path(__file__).resolve().parents[2] / "packaging" / "config" / "agent.toml"
SECTIONS = ("fleet", "mqtt", "api", "runtime", "update")
# (section, key): why the shipped file shows a value that is not the default
EXAMPLES = {
    ("", "device_id"): "required with [fleet]: the placeholder the agent refuses",
    ("", "state_dir"): "required", ("", "trust_root"): "required",
    ("fleet", "url"): "required in [fleet]: the placeholder",
    ("fleet", "enrollment_token"): "the placeholder", ("fleet", "labels"): "an example",
    ("fleet", "poll_interval_s"): "the Debian default for a device that MQTT notices wake",
    ("mqtt", "url"): "an example; the default comes from the fleet",
    ("mqtt", "ca_file"): "an example path", ("mqtt", "certificate"): "the alternative to a password",
    ("api", "unix_socket"): "the path the systemd unit's RuntimeDirectory makes",
    ("api", "listen"): "shown so it is easy to change",
}
# set on purpose for devices in the field; the line names the real default
OVERRIDES = {("update", "trial_seconds"), ("update", "trial_max_restarts")}
BASE: dict[str, Any] = {"device_id": "d", "state_dir": "/s", "trust_root": "/r.json",
                        "fleet": {"url": "http://f"}, "mqtt": {}, "api": {}, "runtime": {}, "update": {}}


def documented() -> dict[tuple[str, str], Any]:
    """(section, key) -> the value the file shows, commented out or not."""
    out: dict[tuple[str, str], Any] = {}
    section = ""
    for line in SHIPPED.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#? ?([a-z_]+ = .*?)(?:\s+#.*)?$", line):
            item = tomllib.loads(m.group(1))
            (key, value), = item.items()
            out[(section, key)] = value
    return out


def known_keys() -> set[tuple[str, str]]:
    """Every key parse_config reads, recorded as its tables finish."""
    seen: set[tuple[str, str]] = set()
    finish = config_module._Table.finish

    def recording(table: Any) -> None:
        seen.update((table.prefix.rstrip("."), k) for k in table.used)
        finish(table)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module._Table, "finish", recording)
        parse_config(BASE)
    return {k for k in seen if k[1] not in SECTIONS}


def test_every_key_is_documented_and_nothing_else() -> None:
    keys, doc = known_keys(), set(documented())
    assert not keys - doc, f"keys the agent reads that agent.toml does not show: {sorted(keys - doc)}"
    assert not doc - keys, f"keys agent.toml shows that the agent does not read: {sorted(doc - keys)}"


@pytest.mark.parametrize(("where", "value"), sorted(documented().items()), ids=lambda x: str(x))
def test_each_shown_value_is_the_real_default(where: tuple[str, str], value: Any) -> None:
    if where in EXAMPLES:
        return
    section, key = where
    default = parse_config(BASE)
    if where in OVERRIDES:
        line = next(x for x in SHIPPED.read_text().splitlines() if x.startswith(f"{key} = "))
        real = getattr(getattr(default, section), key)
        assert f"# default {real!r}" in line, f"{line!r} must name the real default {real!r}"
        return
    doc = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    (doc[section] if section else doc)[key] = value
    assert parse_config(doc) == default, (
        f"agent.toml shows {section}.{key} = {value!r}, which is not the agent's default")
