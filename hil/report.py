"""The report of one run: what each device did, what the fleet thinks it did, whether the
two agree, and the verdict against the scenario's expectations. Written as report.json
and report.md next to the run's logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.demo.scenario import MODEL
from hil.evidence import judge

if TYPE_CHECKING:
    from hil.runner import HilRun


def _releases(result: dict[str, Any]) -> tuple[set[int], set[int]]:
    """(healthy: r1 and its re-issues, new: the scenario's release and its re-issues)."""
    r1 = result["bundles"]["r1"]["release"]
    new = result["bundles"]["new"]["release"]
    healthy, fresh = {r1}, {new}
    for b in result.get("fleet_bundles", []):
        if b.get("reissue_of") == r1:
            healthy.add(b["release"])
        if b.get("reissue_of") == new:
            fresh.add(b["release"])
    return healthy, fresh


def build_report(run: HilRun, result: dict[str, Any], error: str | None) -> dict[str, Any]:
    sc = run.sc
    devices: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    verdict = error is None and bool(result)
    if result:
        healthy, fresh = _releases(result)
        known = healthy | fresh
        rollout = result["rollout"]
        ok = rollout["state"] in sc.expect.rollout
        checks.append({"check": "rollout state", "ok": ok,
                       "detail": f"{rollout['state']} (expected {' or '.join(sc.expect.rollout)})"
                                 + (f": {rollout['reason']}" if rollout.get("reason") else "")})
        verdict &= ok
        converged = result["converged"]
        checks.append({"check": "devices converged", "ok": converged,
                       "detail": "every agent's active release is what the fleet assigns" if converged
                       else "some agent's active release differs from the fleet's assignment after 30 s"})
        verdict &= result["converged"]
        for device, dev in run.devices.items():
            agent = result["agents"][device]
            st = agent.get("state_file") or {}
            active = (st.get("active") or {}).get("release")
            fleet_dev = result["fleet_devices"].get(device, {})
            reported = (fleet_dev.get("models") or {}).get(MODEL) or {}
            reported_release = reported.get("release") if isinstance(reported, dict) else reported
            assigned = (fleet_dev.get("assigned") or {}).get(MODEL, {}).get("release")
            views = {"agent_state_file": active, "agent_api": agent.get("api_release"),
                     "fleet_reported": reported_release, "fleet_assigned": assigned}
            if run.mode == "ssh":  # what `edgefleet-agent status --json` says on the device
                views["agent_status"] = agent.get("status_release")
            match = active is not None and len({v for v in views.values()}) == 1
            if sc.expect.serving == "healthy":
                serving_ok = active in healthy
            elif sc.expect.serving == "new":
                serving_ok = active in fresh
            else:
                serving_ok = active in known
            devices[device] = {
                "final_release": active, "state": st.get("state"), "reason": st.get("reason"),
                "views": views, "views_match": match, "serving_ok": serving_ok,
                "online_in_fleet": fleet_dev.get("online"), "traffic": result["traffic"].get(device),
                "events": dev.events, "address": dev.addr,
            }
            if run.mode == "ssh":
                devices[device].update({k: agent.get(k) for k in ("status_state", "status_error", "log",
                                                                   "polls", "api_error")})
            if sc.expect.views_match:
                verdict &= match
            verdict &= serving_ok
        bad_views = [d for d, v in devices.items() if not v["views_match"]]
        checks.append({"check": "fleet view matches devices", "ok": not bad_views,
                       "detail": "all agree" if not bad_views else "differ on " + "; ".join(
                           f"{d} ({', '.join(f'{k} {v}' for k, v in devices[d]['views'].items())})"
                           for d in bad_views)})
        bad_serving = [f"{d} r{v['final_release']}" for d, v in devices.items() if not v["serving_ok"]]
        checks.append({"check": f"serving {sc.expect.serving}", "ok": not bad_serving,
                       "detail": f"healthy {sorted(healthy)}, new {sorted(fresh)}"
                       + (f"; wrong: {', '.join(bad_serving)}" if bad_serving else "")})
    # every fault the scenario names must have fired where it says (hil.evidence)
    for entry in run.faults_log:
        if not entry.get("primary"):
            continue
        fired, detail = judge(entry, devices.get(entry["device"] or ""))
        entry["fired"] = fired
        where = f" {entry['device']}" if entry["device"] else ""
        asked = entry.get("asked") or {}
        when = f" in {asked['when_state']}" if asked.get("when_state") else ""
        checks.append({"check": f"fault fired: {entry['action']}{where}{when}", "ok": fired,
                       "detail": detail})
        verdict &= fired
    unreachable: dict[str, str] = getattr(run, "unreachable", {})
    if unreachable:
        checks.append({"check": "devices reachable", "ok": False,
                       "detail": "; ".join(f"{d}: {why}" for d, why in unreachable.items())})
        verdict = False
    report = {
        "scenario": sc.name, "description": sc.description, "file": str(sc.path) if sc.path else None,
        "mode": run.mode, "verdict": "pass" if verdict else "fail", "error": error,
        "duration_s": round(time.monotonic() - run.t0, 1),
        "rollout_duration_s": round(run.rollout_end - run.rollout_t0, 1)
        if run.rollout_end and run.rollout_t0 else None,
        "why_process_mode": run.why_process or None,
        "capabilities": {"netns": run.caps.netns, "netem": run.caps.netem, "nftables": run.caps.nft,
                         "tmpfs": run.caps.tmpfs, "why_not": run.caps.reasons},
        "checks": checks, "faults": run.faults_log, "skipped": run.skipped, "devices": devices,
        "rollout": {k: result["rollout"].get(k) for k in ("id", "state", "reason", "current_stage_name",
                                                           "events")} if result else None,
        "logs": str(run.work / "logs"),
    }
    if run.mode == "ssh":
        report["inventory"] = getattr(run, "inventory_path", None)
        report["device_map"] = getattr(run, "device_map", {})
        report["unreachable"] = unreachable
    write_report(run.report_dir, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# HIL: {r['scenario']} — {r['verdict'].upper()}", ""]
    if r["description"]:
        lines += [r["description"], ""]
    mode = r["mode"]
    if mode == "ssh":
        mapping = ", ".join(f"{k} = {v}" for k, v in r.get("device_map", {}).items())
        where = f"- mode: **ssh**: real devices from `{r.get('inventory')}` ({mapping})"
    elif mode == "netns":
        where = "- mode: **netns**"
    else:
        where = (f"- mode: **{mode}** (no network namespaces: link impairments were skipped; "
                 f"{r['why_process_mode']})")
    lines += [where,
              f"- duration: {r['duration_s']} s (rollout {r['rollout_duration_s']} s)",
              f"- logs: `{r['logs']}`"]
    if r["error"]:
        lines += [f"- **error**: {r['error']}"]
    if r["rollout"]:
        lines += [f"- rollout {r['rollout']['id']}: **{r['rollout']['state']}**"
                  + (f" — {r['rollout']['reason']}" if r["rollout"].get("reason") else "")]
    lines += ["", "## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else '**no**'} | {c['detail']} |" for c in r["checks"]]
    ssh = mode == "ssh"
    lines += ["", "## Devices", "",
              "| device | final release | state | agent file | agent API | "
              + ("agent status (ssh) | " if ssh else "") + "fleet reported | fleet assigned | match |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if ssh else "")]
    for d, v in r["devices"].items():
        w = v["views"]
        lines.append(f"| {d} | r{v['final_release']} | {v['state']} | {w['agent_state_file']} | "
                     f"{w['agent_api']} | " + (f"{w.get('agent_status')} | " if ssh else "")
                     + f"{w['fleet_reported']} | {w['fleet_assigned']} | "
                     f"{'yes' if v['views_match'] else '**no**'} |")
    if r.get("unreachable"):
        lines += ["", "## Unreachable devices", ""]
        lines += [f"- {d}: {why}" for d, why in r["unreachable"].items()]
    lines += ["", "## Faults", ""]
    for f in r["faults"]:
        what = f.get("result") or f"skipped: {f.get('skipped')}"
        trigger = f" ({f['trigger']})" if f.get("trigger") else ""
        lines.append(f"- {f['t']:7.2f}s {f['action']} {f['device'] or ''}{trigger}: {what}")
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in r["skipped"]]
    lines += ["", "## Device events", ""]
    for d, v in r["devices"].items():
        evs = "; ".join(f"{e['t']}s " + (f"{e['state']} r{e['active_release']}" + (f" ({e['reason']})"
                        if e.get("reason") else "") if "state" in e else f"{e['action']}")
                        for e in v["events"])
        lines.append(f"- {d}: {evs}")
    if r["rollout"] and r["rollout"].get("events"):
        lines += ["", "## Rollout events", ""]
        lines += [f"- {e.get('kind')}: {e.get('message', '')}" for e in r["rollout"]["events"]]
    return "\n".join(lines) + "\n"
