"""Health gates, device progress, inconclusive handling and approval: the pure engine, no database."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.rollout.engine import (
    DeviceState,
    GateStatus,
    HealthWindow,
    InstallEvent,
    Progress,
    SpecError,
    Verdict,
    evaluate_stage,
    parse_spec,
)
from fleet.rollout.progress import device_progress

T0 = 1_000_000.0
TARGET = 12


def spec(gates: dict[str, Any] | None = None, stage: dict[str, Any] | None = None, **over: Any) -> Any:
    data: dict[str, Any] = {
        "name": "r12",
        "bundle_id": 3,
        "stages": [
            {"name": "canary", "bake_seconds": 60, **(stage or {})},
            {"name": "all", "percent": 100},
        ],
        "gates": gates if gates is not None else {},
        **over,
    }
    return parse_spec(data)


def committed(n: int = 3, **kw: Any) -> list[DeviceState]:
    return [DeviceState(f"d{i}", 0, TARGET, "committed", **kw) for i in range(n)]


def windows(n: int = 3, inferences: int = 200, errors: int = 0, **kw: Any) -> list[HealthWindow]:
    return [HealthWindow(f"d{i}", TARGET, inferences, errors, **kw) for i in range(n)]


def run(s: Any, devices: Any, health: Any = (), events: Any = (), *, elapsed: float = 100, **kw: Any) -> Any:
    return evaluate_stage(s, 0, TARGET, devices, health, events, now=T0 + elapsed, stage_started_at=T0, **kw)


def gate(decision: Any, name: str) -> Any:
    return next(g for g in decision.gates if g.gate == name)


# -- spec -------------------------------------------------------------------------------


def test_new_spec_fields_have_documented_defaults() -> None:
    s = spec()
    assert (s.silent_after_s, s.on_inconclusive, s.extend_seconds, s.max_extensions) == (300, "pause", 60, 3)
    assert (s.gates.max_local_rollbacks, s.gates.max_silent_devices, s.gates.min_devices) == (0, 0, 1)
    assert s.gates.max_latency_ratio is None and s.gates.max_drift is None
    assert s.stages[0].approval is False and s.stages[0].mode == "switch"


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"stage": {"mode": "shadow"}}, "gates", "runs in shadow: set min_agreement"),
        ({"stage": {"mode": "mirror"}}, "stages[0].mode", "'switch' or 'shadow'"),
        ({"stage": {"approval": "yes"}}, "stages[0].approval", ""),
        ({"stage": {"gates": {"max_drift": -1}}}, "stages[0].gates.max_drift", ">= 0"),
        ({"gates": {"max_latency_ratio": 0}}, "gates.max_latency_ratio", "> 0"),
        ({"gates": {"max_offline_fraction": 1.5}}, "gates.max_offline_fraction", "[0, 1]"),
        ({"gates": {"max_local_rollbacks": -1}}, "gates.max_local_rollbacks", ">= 0"),
        ({"gates": {"min_devices": 0}}, "gates.min_devices", ">= 1"),
        ({"on_inconclusive": "shrug"}, "on_inconclusive", "'pause', 'extend' or 'fail'"),
        ({"silent_after_s": 0}, "silent_after_s", "> 0"),
        ({"extend_seconds": -5}, "extend_seconds", "> 0"),
        ({"max_extensions": -1}, "max_extensions", ">= 0"),
    ],
)
def test_new_spec_errors_name_the_field(change: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(**change)
    assert info.value.field == field, str(info.value)
    assert text in str(info.value)


def test_stage_gates_replace_the_rollout_gates() -> None:
    s = spec(gates={"max_error_rate": 0.01, "min_inferences": 10}, stage={"gates": {"max_error_rate": 0.5}})
    d = run(s, committed(), windows(errors=40))  # 20 % errors: over 0.01, under 0.5
    assert d.verdict is Verdict.ADVANCE, d.message


# -- device progress ---------------------------------------------------------------------


def progress(events: list[InstallEvent], device: DeviceState | None = None, now: float = T0) -> Any:
    device = device or DeviceState("d0", 0, 11, "idle", assigned_at=T0)
    return device_progress(device, TARGET, events, now=now, silent_after_s=300)


def test_progress_follows_the_update_events() -> None:
    assert progress([]).progress is Progress.ASSIGNED
    assert progress([InstallEvent("d0", TARGET, "download_started")]).progress is Progress.DOWNLOADING
    activated = [InstallEvent("d0", TARGET, "download_started"), InstallEvent("d0", TARGET, "activated")]
    assert progress(activated).progress is Progress.TRIAL  # activated is not updated yet
    assert progress([*activated, InstallEvent("d0", TARGET, "committed")]).progress is Progress.COMMITTED
    # the health report alone proves it too
    on_target = DeviceState("d0", 0, TARGET, "committed", assigned_at=T0)
    assert progress([], on_target).progress is Progress.COMMITTED
    assert progress([], DeviceState("d0", 0, TARGET, "trial")).progress is Progress.TRIAL
    assert progress([], DeviceState("d0", 0, 11, "downloading")).progress is Progress.DOWNLOADING


def test_progress_failures_carry_the_device_reason_code() -> None:
    p = progress([InstallEvent("d0", TARGET, "failed", "hash")])
    assert (p.progress, p.reason) == (Progress.FAILED, "hash")
    # a retry that gets further replaces the failure
    retried = [
        InstallEvent("d0", TARGET, "failed", "download"),
        InstallEvent("d0", TARGET, "download_started"),
    ]
    assert progress(retried).progress is Progress.DOWNLOADING
    # superseded is the fleet's own doing, not a failure of the release
    assert progress([InstallEvent("d0", TARGET, "failed", "superseded")]).progress is Progress.ASSIGNED


def test_progress_local_rollback_uses_from_release() -> None:
    # the agent reports release = what it serves again, from_release = the one it left
    back = InstallEvent("d0", 11, "rolled_back", "trial_errors", from_release=TARGET)
    p = progress([InstallEvent("d0", TARGET, "activated"), back])
    assert (p.progress, p.reason) == (Progress.ROLLED_BACK, "trial_errors")
    assert "rolled back to r11" in p.detail
    # a rollback away from another release is not ours
    other = InstallEvent("d0", TARGET, "rolled_back", "trial_errors", from_release=13)
    assert progress([other]).progress is Progress.ASSIGNED
    # even a stale "committed" health entry does not hide the rollback
    stale = DeviceState("d0", 0, TARGET, "committed", assigned_at=T0)
    assert progress([back], stale).progress is Progress.ROLLED_BACK


def test_progress_silent_after_the_deadline() -> None:
    never = DeviceState("d0", 0, 11, "idle", assigned_at=T0, last_seen=T0 - 50)
    assert progress([], never, now=T0 + 299).progress is Progress.ASSIGNED
    p = progress([], never, now=T0 + 301)
    assert (p.progress, p.reason) == (Progress.SILENT, "silent")
    assert "never heard from since assigned" in p.detail
    quiet = DeviceState("d0", 0, TARGET, "committed", assigned_at=T0, last_seen=T0 + 100)
    assert progress([], quiet, now=T0 + 350).progress is Progress.COMMITTED
    p = progress([], quiet, now=T0 + 401)
    assert p.progress is Progress.SILENT and "last heard 301 s ago" in p.detail and "committed" in p.detail


# -- each gate: pass, fail, not enough sample -------------------------------------------------


def test_error_rate_needs_devices_too() -> None:
    s = spec(gates={"max_error_rate": 0.05, "min_inferences": 100, "min_devices": 2})
    d = run(s, committed(2), [HealthWindow("d0", TARGET, 500, 0)], elapsed=10)
    g = gate(d, "max_error_rate")
    assert g.status is GateStatus.WAIT and (g.sample, g.min_sample, g.unit) == (1, 2, "devices")
    d = run(s, committed(2), windows(2, errors=1))
    assert gate(d, "max_error_rate").status is GateStatus.PASS and d.verdict is Verdict.ADVANCE


def baseline(n: int = 3, p95: float = 10.0) -> list[HealthWindow]:
    return [HealthWindow(f"d{i}", 11, 100, 0, p95_ms=p95) for i in range(n)]


def test_latency_ratio_gate() -> None:
    s = spec(gates={"max_latency_ratio": 1.5, "min_inferences": 100})
    slow = run(s, committed(), windows(p95_ms=20.0), baseline=baseline(), elapsed=5)
    assert slow.verdict is Verdict.FAIL and slow.gate == "max_latency_ratio"
    assert "latency p95 ratio 2.00 > 1.5 (p95 20.0 ms vs 10.0 ms on the previous release" in slow.message
    g = gate(slow, "max_latency_ratio")
    assert (g.observed, g.threshold, g.sample) == (2.0, 1.5, 3)
    assert g.figures["per_device"] == {"d0": 2.0, "d1": 2.0, "d2": 2.0}
    ok = run(s, committed(), windows(p95_ms=12.0), baseline=baseline())
    assert gate(ok, "max_latency_ratio").status is GateStatus.PASS and ok.verdict is Verdict.ADVANCE
    # the median device decides: one slow device of three does not fail the stage
    mixed = [*windows(2, p95_ms=11.0), HealthWindow("d2", TARGET, 200, 0, p95_ms=50.0)]
    assert run(s, committed(), mixed, baseline=baseline()).verdict is Verdict.ADVANCE


def test_latency_without_baseline_is_inconclusive_not_a_pass() -> None:
    s = spec(gates={"max_latency_ratio": 1.5})
    d = run(s, committed(), windows(p95_ms=12.0), baseline=[])
    assert d.verdict is Verdict.INCONCLUSIVE
    assert "inconclusive: gate max_latency_ratio has 0 of 1 devices" in d.message
    g = gate(d, "max_latency_ratio")
    assert g.figures["without_baseline"] == ["d0", "d1", "d2"]


def test_drift_gate() -> None:
    s = spec(gates={"max_drift": 0.3, "min_devices": 2})
    high = run(s, committed(), windows(drift=0.45), elapsed=5)
    assert high.verdict is Verdict.FAIL and "drift 0.45 > 0.3 over 3 windows on 3 devices" in high.message
    assert run(s, committed(), windows(drift=0.1)).verdict is Verdict.ADVANCE
    # agents that do not send drift: no data, inconclusive
    d = run(s, committed(), windows(drift=None))
    assert d.verdict is Verdict.INCONCLUSIVE and "gate max_drift has 0 of 2 devices" in d.message


def test_install_failures_ignore_superseded() -> None:
    s = spec(gates={"max_install_failures": 0})
    events = [InstallEvent("d1", TARGET, "failed", "superseded")]
    assert run(s, committed(), [], events).verdict is Verdict.ADVANCE
    events = [InstallEvent("d1", TARGET, "failed", "signature")]
    d = run(s, committed(), [], events, elapsed=1)
    assert d.verdict is Verdict.FAIL and "install_failures 1 > 0 on 1 device (signature)" in d.message


def test_retried_download_failures_stop_counting_once_the_device_got_past_them() -> None:
    s = spec(gates={"max_install_failures": 0})
    failed = [InstallEvent("d1", TARGET, "failed", "download")]
    still = run(s, committed(), [], failed, elapsed=1)  # its latest word: counts
    assert still.verdict is Verdict.FAIL and "install_failures 1 > 0 on 1 device (download)" in still.message
    retry = [*failed, InstallEvent("d1", TARGET, "download_started", None)]  # a new attempt is no progress
    assert run(s, committed(), [], retry, elapsed=1).verdict is Verdict.FAIL
    got_past = [*retry, InstallEvent("d1", TARGET, "verified", None),
                InstallEvent("d1", TARGET, "committed", None)]
    assert run(s, committed(), [], got_past).verdict is Verdict.ADVANCE
    disk = [InstallEvent("d1", TARGET, "failed", "disk_full"), InstallEvent("d1", TARGET, "staged", None)]
    assert run(s, committed(), [], disk).verdict is Verdict.ADVANCE
    # a failure that says the release is bad counts for good, whatever follows
    bad = [InstallEvent("d1", TARGET, "failed", "hash"), InstallEvent("d1", TARGET, "committed", None)]
    assert run(s, committed(), [], bad, elapsed=1).verdict is Verdict.FAIL
    # another release's progress does not clear it
    other = [*failed, InstallEvent("d1", TARGET + 1, "committed", None)]
    assert run(s, committed(), [], other, elapsed=1).verdict is Verdict.FAIL


def test_local_rollback_fails_at_once_by_default() -> None:
    events = [InstallEvent("d1", 11, "rolled_back", "trial_errors", from_release=TARGET)]
    devices = [*committed(3)[::2], DeviceState("d1", 0, 11, "rolled_back")]
    d = run(spec(), devices, [], events, elapsed=1)
    assert d.verdict is Verdict.FAIL and d.gate == "max_local_rollbacks"
    assert d.message == "stage canary: local_rollbacks 1 > 0: d1 trial_errors"
    assert gate(d, "max_local_rollbacks").figures["devices"] == {"d1": "trial_errors"}
    by_id = {p.device_id: p for p in d.devices}
    assert (by_id["d1"].progress, by_id["d1"].reason) == (Progress.ROLLED_BACK, "trial_errors")
    # allowed one: the stage goes on without that device
    allowed = run(spec(gates={"max_local_rollbacks": 1}), devices, [], events)
    assert (
        allowed.verdict is Verdict.ADVANCE and "not updated: 1 rolled_back (trial_errors)" in allowed.message
    )


def test_silent_devices_count_against_the_stage() -> None:
    devices = [
        *committed(2, assigned_at=T0, last_seen=T0 + 350),
        DeviceState("d2", 0, 11, "idle", assigned_at=T0),
    ]
    d = run(spec(), devices, elapsed=200)
    assert d.verdict is Verdict.WAIT and "2 of 3 devices report r12 committed (1 assigned)" in d.message
    d = run(spec(), devices, elapsed=400)
    assert d.verdict is Verdict.FAIL and d.gate == "max_silent_devices"
    assert d.message == "stage canary: silent_devices 1 > 0: d2 silent"
    d = run(spec(gates={"max_silent_devices": 1}), devices, elapsed=400)
    assert d.verdict is Verdict.ADVANCE, d.message


def test_silent_device_holds_the_stage_when_no_gate_counts_it() -> None:
    devices = [*committed(2), DeviceState("d2", 0, 11, "idle", assigned_at=T0)]
    d = run(spec(gates={"max_silent_devices": None}), devices, elapsed=400)
    assert d.verdict is Verdict.WAIT and "(1 silent)" in d.message  # never passes silently


def test_offline_fraction_stops_the_stage() -> None:
    s = spec(gates={"max_offline_fraction": 0.3})
    devices = [
        DeviceState("d0", 0, TARGET, "committed", online=True, last_seen=T0),
        DeviceState("d1", 0, 11, "downloading", online=False, last_seen=T0),
        DeviceState("d2", 0, 11, "idle", online=False, last_seen=None),  # never connected: not counted
    ]
    d = run(s, devices, elapsed=10)
    assert d.verdict is Verdict.FAIL and d.gate == "max_offline_fraction"
    assert "offline_fraction 0.33 > 0.3: 1 of 3 devices offline or silent (d1)" in d.message
    assert run(spec(gates={"max_offline_fraction": 0.5}), devices, elapsed=10).verdict is Verdict.WAIT
    # offline since before it was told to update: not "during the update" (counts once silent)
    before = [devices[0], DeviceState("d1", 0, 11, "idle", online=False, last_seen=T0 - 60, assigned_at=T0),
              devices[2]]
    assert run(s, before, elapsed=10).verdict is not Verdict.FAIL
    went = DeviceState("d1", 0, 11, "downloading", online=False, last_seen=T0 + 5, assigned_at=T0)
    after = [devices[0], went, devices[2]]
    assert run(s, after, elapsed=10).gate == "max_offline_fraction"


def test_every_result_carries_its_figures() -> None:
    s = spec(gates={"max_error_rate": 0.05, "min_inferences": 100})
    d = run(s, committed(), windows(errors=2))
    g = gate(d, "max_error_rate").to_json()
    assert {k: g[k] for k in ("gate", "status", "observed", "threshold", "sample", "min_sample", "unit")} == {
        "gate": "max_error_rate",
        "status": "pass",
        "observed": 0.01,
        "threshold": 0.05,
        "sample": 600,
        "min_sample": 100,
        "unit": "inferences",
    }


# -- inconclusive -------------------------------------------------------------------------

SHORT = {"max_error_rate": 0.05, "min_inferences": 1000}


def test_inconclusive_pauses_by_default() -> None:
    s = spec(gates=SHORT)
    assert run(s, committed(), windows(), elapsed=30).verdict is Verdict.WAIT  # still baking
    d = run(s, committed(), windows())
    assert d.verdict is Verdict.INCONCLUSIVE
    assert d.message == "stage canary: inconclusive: gate max_error_rate has 600 of 1000 inferences"
    assert d.gate == "max_error_rate"


def test_inconclusive_extends_a_bounded_number_of_times() -> None:
    s = spec(gates=SHORT, on_inconclusive="extend", extend_seconds=30, max_extensions=2)
    d = run(s, committed(), windows(), elapsed=61)
    assert d.verdict is Verdict.EXTEND and "bake time extended by 30 s (1 of 2)" in d.message
    d = run(s, committed(), windows(), elapsed=70, extensions=1)
    assert d.verdict is Verdict.WAIT and "bake 70 s of 90 s (extended 1x by 30 s)" in d.message
    assert run(s, committed(), windows(), elapsed=91, extensions=1).verdict is Verdict.EXTEND
    d = run(s, committed(), windows(), elapsed=121, extensions=2)
    assert d.verdict is Verdict.INCONCLUSIVE and "after 2 extensions" in d.message
    # data arriving during an extension lets it pass
    assert run(s, committed(), windows(inferences=400), elapsed=91, extensions=1).verdict is Verdict.ADVANCE


def test_inconclusive_fails_when_told_to() -> None:
    d = run(spec(gates=SHORT, on_inconclusive="fail"), committed(), windows())
    assert d.verdict is Verdict.FAIL and d.gate == "max_error_rate"
    assert "inconclusive: gate max_error_rate has 600 of 1000 inferences after 100 s" in d.message


# -- approval -----------------------------------------------------------------------------


def test_approval_waits_after_the_stage_passed() -> None:
    s = spec(gates={"max_error_rate": 0.05, "min_inferences": 100}, stage={"approval": True})
    assert run(s, committed(), windows(), elapsed=30).verdict is Verdict.WAIT
    d = run(s, committed(), windows())
    assert d.verdict is Verdict.AWAIT_APPROVAL and d.message.endswith("waiting for approval")
    assert run(s, committed(), windows(), approved=True).verdict is Verdict.ADVANCE


def test_failed_gate_wins_over_approval_wait_and_approval() -> None:
    s = spec(gates={"max_error_rate": 0.05, "min_inferences": 100}, stage={"approval": True})
    for approved in (False, True):
        d = run(s, committed(), windows(errors=100), approved=approved)
        assert d.verdict is Verdict.FAIL and d.gate == "max_error_rate"
