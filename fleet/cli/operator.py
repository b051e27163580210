"""Operator commands over the fleet HTTP API: bundle upload/list, devices, rollouts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.cli.client import TERMINAL_STATES, FleetClient, default_token, default_url
from fleet.cli.output import CliError, ago, console, figure, human_size, labels_text, print_json
from shared.timeutil import parse_time

if TYPE_CHECKING:
    from rich.console import RenderableType

EXIT_ROLLOUT_FAILED = 3


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.fleet or default_url(), args.token or default_token(), timeout=args.http_timeout)


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return default


# -- bundles ----------------------------------------------------------------------------


def bundle_upload(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"bundle {path} does not exist")
    size = path.stat().st_size
    with _client(args) as client:
        err = console(stderr=True)
        progress = Progress(
            TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
            disable=not err.is_terminal,
        )
        with progress:
            task = progress.add_task(path.name, total=size)
            info = client.upload_bundle(path, progress=lambda n: progress.advance(task, n))
    if args.json:
        print_json(info)
        return 0
    print(f"uploaded {path.name} ({human_size(size)}): bundle id {info.get('id')}, "
          f"{info.get('name')} release {info.get('release')} ({info.get('version')}), "
          f"digest {str(info.get('digest', ''))[:16]}…")
    return 0


def bundle_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _client(args) as client:
        bundles = client.list_bundles()
    if args.json:
        print_json(bundles)
        return 0
    table = Table(title=f"bundles ({len(bundles)})", title_justify="left")
    for col in ("id", "name", "release", "version", "digest", "created", "expires"):
        table.add_column(col, justify="right" if col in ("id", "release") else "left")
    for b in bundles:
        reissue = f" (re-issue of {b['reissue_of']})" if b.get("reissue_of") else ""
        table.add_row(str(b.get("id", "")), str(b.get("name", "")), f"{b.get('release', '')}{reissue}",
                      str(b.get("version", "")), str(b.get("digest", ""))[:12],
                      str(b.get("created", "")), str(b.get("expires", "")))
    console().print(table)
    return 0


# -- devices ----------------------------------------------------------------------------


def _releases(device: dict[str, Any]) -> str:
    models = _get(device, "active_releases", "models", default={})
    if isinstance(models, dict):
        parts = []
        for name, info in sorted(models.items()):
            if isinstance(info, dict):
                state = f" {info['state']}" if info.get("state") else ""
                version = f" ({info['version']})" if info.get("version") else ""
                parts.append(f"{name} r{info.get('release', '?')}{version}{state}")
            else:
                parts.append(f"{name} r{info}")
        return ", ".join(parts) or "-"
    if isinstance(models, list):
        texts = [f"{m.get('name', '?')} r{m.get('release', '?')}"
                 + (f" ({m['version']})" if m.get("version") else "") if isinstance(m, dict) else str(m)
                 for m in models]
        return ", ".join(texts) or "-"
    return str(models)


def when(value: Any) -> str:
    """"3m ago" on a terminal; the absolute UTC time in pipes and logs (a relative time read
    later, or by a script, is wrong)."""
    if sys.stdout.isatty():
        return ago(value)
    ts = parse_time(value)
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts is not None else ago(value)


_when_text = when


def device_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _client(args) as client:
        devices = client.list_devices()
    if args.json:
        print_json(devices)
        return 0
    online = sum(1 for d in devices if d.get("online"))
    table = Table(title=f"devices ({len(devices)}, {online} online)", title_justify="left")
    for col in ("id", "labels", "online", "last seen", "active releases"):
        table.add_column(col)
    for d in sorted(devices, key=lambda d: str(_get(d, "id", "device_id", default=""))):
        status = d.get("status")  # revoked | reenrollment_pending | active
        table.add_row(
            str(_get(d, "id", "device_id", default="?")),
            labels_text(d.get("labels")),
            f"[red]{status}[/]" if status and status != "active"
            else "[green]yes[/]" if d.get("online") else "[red]no[/]",
            when(d.get("last_seen")),
            _releases(d),
        )
    console().print(table)
    return 0


# -- rollouts ---------------------------------------------------------------------------


def _load_spec(path_text: str) -> dict[str, Any]:
    import tomllib

    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"rollout spec {path} does not exist")
    text = path.read_bytes()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            spec = tomllib.loads(text.decode())
        elif suffix == ".json":
            spec = json.loads(text)
        else:
            raise CliError(f"rollout spec {path} must end in .json or .toml")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"rollout spec {path} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(spec, dict):
        raise CliError(f"rollout spec {path} must hold an object (name, bundle_id, stages, ...)")
    return spec


def rollout_create(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)
    if getattr(args, "reissue", False):
        spec["reissue"] = True
    with _client(args) as client:
        rollout = client.create_rollout(spec)
        warnings = list(rollout.get("warnings") or [])  # only the create answer carries them
        rid = rollout.get("id")
        if args.start and rid is not None:
            rollout = {**client.rollout_action(int(rid), "start"), "warnings": warnings}
    if args.json:
        print_json(rollout)
        return 0
    if not rollout.get("devices"):
        selector = spec.get("selector") or {}
        which = ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) if selector else "every device"
        warnings.append(f"the rollout matches no device ({which}): no device is enrolled with those "
                        "labels yet; 'edgefleet device list' shows the labels devices have")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    started = "started" if args.start else f"created; start it with 'edgefleet rollout start {rid}'"
    print(f"rollout {rid} '{rollout.get('name', spec.get('name', ''))}' {started} "
          f"(state {rollout.get('state', '?')}): {rollout.get('model', '?')} r{rollout.get('release', '?')} "
          f"({rollout.get('version', '?')})")
    if rollout.get("reissue_of") and any(e.get("kind") == "reissued" for e in rollout.get("events") or []):
        print(f"  re-issued r{rollout['reissue_of']} as r{rollout.get('release')}: some devices had "
              "accepted a higher release")
    return 0


def rollout_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _client(args) as client:
        rollouts = client.list_rollouts()
    if args.json:
        print_json(rollouts)
        return 0
    table = Table(title=f"rollouts ({len(rollouts)})", title_justify="left")
    for col in ("id", "name", "model", "release", "bundle", "state", "stage", "reason"):
        table.add_column(col)
    for r in rollouts:
        table.add_row(str(r.get("id", "")), str(r.get("name", "")), str(r.get("model", "")),
                      _release_text(r), str(r.get("bundle_id", "")), _state_markup(str(r.get("state", ""))),
                      _stage_name(r), str(r.get("reason") or ""))
    console().print(table)
    return 0


def _release_text(r: dict[str, Any]) -> str:
    """``r12 (1.2.0)``: the release number with its version label beside it."""
    if r.get("release") is None:
        return "-"
    version = f" ({r['version']})" if r.get("version") else ""
    reissue = f", re-issue of r{r['reissue_of']}" if r.get("reissue_of") else ""
    return f"r{r['release']}{version}{reissue}"


_NOT_UPDATED = ("failed", "rolled_back", "silent")


def _state_markup(state: str) -> str:
    colors = {"succeeded": "green", "running": "cyan", "paused": "yellow", "created": "white"}
    color = colors.get(state, "red")
    return f"[{color}]{state}[/]"


def _stage_name(r: dict[str, Any]) -> str:
    stages = r.get("stages") or []
    current = r.get("current_stage")
    if isinstance(current, int) and 0 <= current < len(stages) and isinstance(stages[current], dict):
        return f"{current + 1}/{len(stages)} {stages[current].get('name', '')}"
    if isinstance(current, int) and stages:
        return f"{min(current + 1, len(stages))}/{len(stages)}"
    return "-" if current is None else str(current)


def _device_count(devices: Any) -> str:
    if isinstance(devices, list):
        names = [str(d.get("device_id", d.get("id", "?"))) if isinstance(d, dict) else str(d)
                 for d in devices]
        shown = ", ".join(names[:4]) + (f", +{len(names) - 4}" if len(names) > 4 else "")
        return f"{len(names)}" + (f" ({shown})" if names else "")
    if isinstance(devices, dict):
        return ", ".join(f"{k} {v}" for k, v in devices.items())
    return figure(devices)


def _gate_text(gates: Any) -> str:
    if isinstance(gates, list):
        parts = []
        for g in gates:
            if isinstance(g, dict):
                name = g.get("name") or g.get("gate") or "gate"
                verdict = g.get("verdict") or g.get("status") or g.get("result") or g.get("state") or ""
                value, bound = g.get("value"), g.get("bound", g.get("threshold"))
                text = f"{name} {verdict}".strip()
                if value is not None:
                    text += f" {figure(value)}" + (f" (bound {figure(bound)})" if bound is not None else "")
                if g.get("message") and value is None:
                    text += f": {g['message']}"
                if isinstance(g.get("figures"), dict) and g["figures"]:
                    text += f" [{figure(g['figures'])}]"
                parts.append(text)
            else:
                parts.append(str(g))
        return "; ".join(parts) or "-"
    if isinstance(gates, dict):
        return figure(gates) or "-"
    return "-" if gates is None else str(gates)


def _event_text(ev: Any) -> str:
    if not isinstance(ev, dict):
        return str(ev)
    when = _get(ev, "ts", "at", "time", "created")
    what = _get(ev, "message", "kind", "state", default="")
    kind = ev.get("kind")
    prefix = f"{kind}: " if kind and ev.get("message") and not str(what).startswith(str(kind)) else ""
    return f"{_when_text(when) if when is not None else '':>9}  {prefix}{what}"


def _latest_gates(r: dict[str, Any]) -> Any:
    """Gate figures: the rollout's own ``gates`` list, else those of its latest evaluation."""
    if isinstance(r.get("gates"), list):
        return r["gates"]
    for ev in reversed(_get(r, "history", "events", default=[]) or []):
        data = ev.get("data") if isinstance(ev, dict) else None
        if isinstance(data, dict) and isinstance(data.get("gates"), list):
            return data["gates"]
    return None


def render_rollout(r: dict[str, Any], *, history: int | None = None) -> RenderableType:
    """A rollout as rich renderables: header, stages table, reason, history."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = str(r.get("state", "?"))
    head = Text.from_markup(
        f"rollout [bold]{r.get('id')}[/] '{r.get('name', '')}' — {_state_markup(state)}"
        f"  model {r.get('model', '?')} {_release_text(r)}, bundle {r.get('bundle_id', '?')}, "
        f"stage {_stage_name(r)}"
    )
    parts: list[RenderableType] = [head]
    stages = r.get("stages") or []
    if stages:
        table = Table(show_edge=False, pad_edge=False)
        for col in ("#", "stage", "state", "devices", "gates"):
            table.add_column(col)
        for i, s in enumerate(stages):
            if not isinstance(s, dict):
                table.add_row(str(i + 1), str(s), "", "", "")
                continue
            table.add_row(
                str(i + 1), str(s.get("name", "")), str(s.get("state") or "-"),
                _device_count(_get(s, "devices", "device_count", "device_ids")),
                _gate_text(_get(s, "gates", "gate_results", "figures")),
            )
        parts.append(table)
    members = r.get("devices")
    if isinstance(members, list) and members:
        texts = [
            f"{d.get('device_id', '?')} (stage {d.get('stage', '?')}, {d.get('status', '?')})"
            if isinstance(d, dict) else str(d)
            for d in members
        ]
        parts.append(Text("devices: " + ", ".join(texts)))
        # What a device said when it refused or failed the release, in its own words.
        for d in members:
            if isinstance(d, dict) and d.get("progress") in _NOT_UPDATED:
                why = d.get("detail") or d.get("reason") or d.get("progress")
                parts.append(Text(f"  {d.get('device_id', '?')} {d.get('progress')}: {why}", style="yellow"))
    gates = _latest_gates(r)
    if gates:
        parts.append(Text("gates:"))
        parts.extend(Text(f"  {line}") for line in _gate_text(gates).split("; "))
    for key in ("figures", "last_evaluation"):
        if r.get(key):
            parts.append(Text(f"{key.replace('_', ' ')}: {_gate_text(r[key])}"))
    if r.get("reason"):
        parts.append(Text(f"reason: {r['reason']}", style="bold yellow" if state != "succeeded" else ""))
    events = _get(r, "history", "events", default=[]) or []
    if events:
        shown = events if history is None else events[-history:]
        parts.append(Text("history:"))
        parts.extend(Text("  " + _event_text(ev)) for ev in shown)
    return Group(*parts)


def rollout_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        r = client.get_rollout(args.id)
    if args.json:
        print_json(r)
        return 0
    console().print(render_rollout(r))
    return 0


def rollout_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        r = client.rollout_action(args.id, args.action)
    if args.json:
        print_json(r)
        return 0
    state = r.get("state", "?") if isinstance(r, dict) else "?"
    print(f"rollout {args.id}: {args.action} accepted, state {state}")
    return 0


def _poll(client: FleetClient, args: argparse.Namespace, deadline: float | None,
          on_update: Any) -> dict[str, Any]:
    """Refresh until a terminal state; ``on_update(rollout)`` after every fetch."""
    r = client.get_rollout(args.id)
    on_update(r)
    while str(r.get("state")) not in TERMINAL_STATES:
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(f"rollout {args.id} is still {r.get('state')} after {args.timeout:g}s; "
                           f"'edgefleet rollout status {args.id}' shows where it stands")
        time.sleep(args.interval)
        r = client.get_rollout(args.id)
        on_update(r)
    return r


def rollout_watch(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    out = console()
    with _client(args) as client:
        if out.is_terminal:
            from rich.live import Live

            with Live(console=out, refresh_per_second=4) as live:
                r = _poll(client, args, deadline, lambda r: live.update(render_rollout(r, history=8)))
        else:
            # Logs and pipes: one line per change instead of a redrawn screen.
            seen = {"events": 0, "line": ""}

            def log(r: dict[str, Any]) -> None:
                line = f"rollout {args.id}: {r.get('state')}, stage {_stage_name(r)}"
                if line != seen["line"]:
                    print(line, flush=True)
                    seen["line"] = line
                events = _get(r, "history", "events", default=[]) or []
                for ev in events[seen["events"]:]:
                    print("  " + _event_text(ev).strip(), flush=True)
                seen["events"] = len(events)

            r = _poll(client, args, deadline, log)
    state = str(r.get("state"))
    if state == "succeeded":
        out.print(f"rollout {args.id} succeeded")
        return 0
    reason = f": {r['reason']}" if r.get("reason") else ""
    out.print(f"rollout {args.id} ended {state}{reason}")
    return EXIT_ROLLOUT_FAILED
