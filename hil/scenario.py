"""Scenarios: TOML data files, parsed and validated into dataclasses.

    name = "bad canary under loss"
    description = "..."
    devices = 4                      # emulated devices (ignored with an inventory)
    canary = ["dev-01"]              # devices labelled ring=canary (default: the first)
    release = "faulty"               # what the staged rollout ships: healthy or faulty
    timeout_s = 90
    [rollout]                         # stages and gates of the staged rollout
    stages = [{ name = "canary", selector = { ring = "canary" }, min_devices = 1, bake_seconds = 4 },
              { name = "all", percent = 100, bake_seconds = 2 }]
    gates = { max_error_rate = 0.05, min_inferences = 30, max_install_failures = 0 }
    on_inconclusive = "extend"        # and extend_seconds, max_extensions, on_gate_failure
    [[faults]]                        # what happens to whom, and when
    action = "loss"                   # loss, delay, link_down, link_up, power_cut, power_on,
                                      # broker_stop, broker_start, disk_full, offline, online
    devices = ["dev-01"]              # or "half", "all", "canary"
    at_s = 0.0                        # seconds after the rollout started ...
    when_state = "downloading"        # ... or the moment the device's state file shows this state
                                      # (power_cut: the cut must land in it, or the scenario fails)
    value = 20.0                      # loss %, delay ms
    duration_s = 3.0                  # undo after this long (power_on, link_up, broker_start, ...)
    [expect]
    rollout = ["rolled_back"]         # acceptable final rollout states
    serving = "healthy"               # healthy (r1 or its re-issue), new, or any
    views_match = true                # fleet's device list agrees with each device's own state
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLLOUT_KEYS = {"stages", "gates", "on_gate_failure", "on_inconclusive", "extend_seconds", "max_extensions"}
ACTIONS = {
    "loss", "delay", "link_down", "link_up", "power_cut", "power_on", "broker_stop", "broker_start",
    "disk_full", "offline", "online",
}
UNDO = {"loss": "loss_clear", "delay": "delay_clear", "link_down": "link_up", "power_cut": "power_on",
        "broker_stop": "broker_start", "offline": "online"}
STATES = {"idle", "downloading", "verifying", "staged", "smoke_testing", "trial", "committed"}


class ScenarioError(ValueError):
    """A scenario file that cannot be run, with the key and the reason."""


@dataclass(frozen=True)
class Fault:
    action: str
    devices: tuple[str, ...] | str = ()
    at_s: float | None = None
    when_state: str | None = None
    value: float | None = None
    duration_s: float | None = None
    after_rollout: bool = False  # at_s counts from the rollout's end instead of its start


@dataclass(frozen=True)
class Expect:
    rollout: tuple[str, ...] = ("succeeded", "rolled_back")
    serving: str = "any"
    views_match: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    devices: int
    canary: tuple[str, ...]
    release: str
    rollout: dict[str, Any]
    faults: tuple[Fault, ...]
    expect: Expect
    timeout_s: float
    disk_mb: int = 0  # a tmpfs of this size as each device's state_dir (0: a plain directory)
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ids: tuple[str, ...] = ()  # real device ids (ssh mode) instead of dev-01, dev-02, ...

    def device_ids(self) -> list[str]:
        if self.ids:
            return list(self.ids)
        return [f"dev-{i:02d}" for i in range(1, self.devices + 1)]


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) and kind is not bool:
        raise ScenarioError(f"{where}{key} = {value!r} must be {kind}")
    if not isinstance(value, kind):
        raise ScenarioError(f"{where}{key} = {value!r} has the wrong type")
    return value


def parse_scenario(data: dict[str, Any], path: Path | None = None) -> Scenario:
    known = {"name", "description", "devices", "canary", "release", "rollout", "faults", "expect",
             "timeout_s", "disk_mb"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    name = _get(data, "name", str, path.stem if path else "scenario", "")
    devices = _get(data, "devices", int, 4, "")
    if not 1 <= devices <= 64:
        raise ScenarioError(f"devices = {devices} must be between 1 and 64")
    canary = tuple(_get(data, "canary", list, ["dev-01"], ""))
    release = _get(data, "release", str, "healthy", "")
    if release not in ("healthy", "faulty"):
        raise ScenarioError(f"release = {release!r}: use healthy or faulty")
    rollout = _get(data, "rollout", dict, {}, "")
    stages = rollout.get("stages") or [{"name": "all", "percent": 100, "bake_seconds": 2}]
    if not isinstance(stages, list) or not all(isinstance(s, dict) and "name" in s for s in stages):
        raise ScenarioError("rollout.stages must be a list of tables with a name")
    unknown = sorted(set(rollout) - ROLLOUT_KEYS)
    if unknown:
        raise ScenarioError(f"rollout.{unknown[0]} is not a rollout key: use "
                            f"{', '.join(sorted(ROLLOUT_KEYS))}")
    # the fleet validates the values (docs/rollouts.md); a loaded harness may need "extend"
    # so that a stage waits for its minimum sample instead of pausing inconclusive
    spec = {"stages": stages, "gates": rollout.get("gates", {}),
            "on_gate_failure": rollout.get("on_gate_failure", "rollback")}
    spec.update({k: v for k, v in rollout.items() if k not in spec})
    faults = []
    for i, raw in enumerate(_get(data, "faults", list, [], "")):
        where = f"faults[{i}]."
        if not isinstance(raw, dict):
            raise ScenarioError(f"faults[{i}] must be a table")
        bad = sorted(set(raw) - {"action", "devices", "at_s", "when_state", "value", "duration_s",
                                 "after_rollout"})
        if bad:
            raise ScenarioError(f"{where}{bad[0]} is not a fault key")
        action = raw.get("action")
        if action not in ACTIONS:
            raise ScenarioError(f"{where}action = {action!r}: use one of {', '.join(sorted(ACTIONS))}")
        devs = raw.get("devices", ())
        if isinstance(devs, str) and devs not in ("all", "half", "canary", "last"):
            raise ScenarioError(f"{where}devices = {devs!r}: a list of ids, or all, half, canary, last")
        when_state = _get(raw, "when_state", str, None, where)
        if when_state is not None and when_state not in STATES:
            raise ScenarioError(f"{where}when_state = {when_state!r}: one of {', '.join(sorted(STATES))}")
        at_s = _get(raw, "at_s", (int, float), None, where)
        if at_s is None and when_state is None:
            at_s = 0.0
        faults.append(Fault(
            action=action, devices=tuple(devs) if isinstance(devs, list) else devs,
            at_s=None if at_s is None else float(at_s), when_state=when_state,
            value=_get(raw, "value", (int, float), None, where),
            duration_s=_get(raw, "duration_s", (int, float), None, where),
            after_rollout=_get(raw, "after_rollout", bool, False, where),
        ))
    exp = _get(data, "expect", dict, {}, "")
    serving = exp.get("serving", "any")
    if serving not in ("healthy", "new", "any"):
        raise ScenarioError(f"expect.serving = {serving!r}: use healthy, new or any")
    expect = Expect(rollout=tuple(exp.get("rollout", Expect.rollout)), serving=serving,
                    views_match=bool(exp.get("views_match", True)))
    return Scenario(
        name=name, description=_get(data, "description", str, "", ""), devices=devices, canary=canary,
        release=release, rollout=spec,
        faults=tuple(faults), expect=expect, timeout_s=float(_get(data, "timeout_s", (int, float), 120, "")),
        disk_mb=_get(data, "disk_mb", int, 0, ""), path=path,
    )


def load_scenario(path: Path) -> Scenario:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from None
    return parse_scenario(data, Path(path))


def resolve_devices(spec: tuple[str, ...] | str, all_ids: list[str], canary: tuple[str, ...]) -> list[str]:
    if spec == "all" or spec == ():
        return list(all_ids)
    if spec == "half":
        return all_ids[: max(1, len(all_ids) // 2)]
    if spec == "canary":
        return [d for d in all_ids if d in canary]
    if spec == "last":
        return all_ids[-1:]
    unknown = [d for d in spec if d not in all_ids]
    if unknown:
        raise ScenarioError(f"fault names unknown devices {unknown} (devices: {', '.join(all_ids)})")
    return list(spec)
