"""fleet.ingest.claims and fleet.ingest.budget, pure: each figure's bound (at the bound accepted,
past it refused with the field, value and bound named), the sequence window, the budgets."""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec
import pytest

from fleet.ingest.budget import Budget, BudgetExceeded, DeviceBudgets
from fleet.ingest.claims import (
    DEFAULT_BOUNDS,
    INT64_MAX,
    MAX_RELEASE,
    WINDOW_BITS,
    ClaimRefused,
    SeqWindow,
    _health_within,
    check,
)
from shared.telemetry import messages

NOW = 1_800_000_000.0


def health(**changes: Any) -> messages.Health:
    """A valid health message (interval 10 s), with fields changed: ``models__0__inferences``
    names a field of the first model, ``models__0__shadow__agreed`` one of its shadow."""
    model = messages.ModelHealth(
        name="detector", release=3, version="1.0.3", state="committed", inferences=100, errors=2,
        total_inferences=1000, total_errors=20, latency_p50_ms=2.0, latency_p95_ms=5.0, drift=0.1,
        drift_inputs={"image": 0.1}, held=[2, 3], waiting=None,
        shadow=messages.ShadowHealth(release=4, samples=10, agreed=9, errors=1, agreement=0.9,
                                     cosine_min=0.5, candidate_p95_ms=6.0, current_p95_ms=5.0,
                                     busy_fraction=0.1),
        last_event=messages.LastEvent(seq=7, ts=NOW - 5, kind="committed", release=3, from_release=2))
    msg = messages.Health(v=1, device_id="d1", seq=9, ts=NOW, interval_s=10.0, models=[model],
                          cpu_percent=10.0, mem_rss_mb=50.0, mem_percent=3.0, disk_free_mb=100.0,
                          temperature_c=40.0, uptime_s=100.0, session="0a1b2c3d")
    data = msgspec.to_builtins(msg)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = data
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[last] = value
    return msgspec.convert(data, messages.Health)


# (field path, a value at its bound (accepted), a value past it (refused))
HEALTH_BOUNDS = [
    ("seq", INT64_MAX, INT64_MAX + 1),
    ("seq", 0, -1),
    ("ts", NOW + 86_400, NOW + 86_401),
    ("ts", 946_684_800.0, 946_684_799.0),
    ("interval_s", 86_400.0, 86_401.0),
    ("interval_s", 0.01, 0.0),  # 10 000/s x 0.01 s still serves the 100 inferences
    ("session", "a" * 32, "a" * 33),
    ("models__0__name", "m" * 64, "m" * 65),
    ("models__0__name", "m", ""),
    ("models__0__release", MAX_RELEASE, MAX_RELEASE + 1),
    ("models__0__release", 0, -1),
    ("models__0__version", "v" * 256, "v" * 257),
    ("models__0__state", "s" * 256, "s" * 257),
    ("models__0__inferences", 100_000, 100_001),  # 10 000/s x 10 s
    ("models__0__inferences", 2, -4109),
    ("models__0__errors", 100, 101),  # at most the window's inferences
    ("models__0__errors", 0, -1),
    ("models__0__total_inferences", INT64_MAX, INT64_MAX + 1),
    ("models__0__total_errors", 1000, 1001),
    ("models__0__latency_p50_ms", 5.0, 5.1),  # at most p95
    ("models__0__latency_p95_ms", 600_000.0, 600_000.5),
    ("models__0__latency_p95_ms", 2.0, -1.0),
    ("models__0__drift", 1000.0, 1000.5),
    ("models__0__drift", 0.0, -0.1),
    ("models__0__held", [MAX_RELEASE] * 16, [1] * 17),
    ("models__0__held", [0], [-1]),
    ("models__0__waiting", "w" * 256, "w" * 257),
    ("models__0__shadow__agreed", 10, 11),
    ("models__0__shadow__errors", 10, 11),
    ("models__0__shadow__samples", 10, -1),
    ("models__0__shadow__agreement", 1.0, 1.5),
    ("models__0__shadow__cosine_min", -1.0, -1.5),
    ("models__0__shadow__busy_fraction", 1.0, 2.0),
    ("models__0__shadow__release", MAX_RELEASE, MAX_RELEASE + 1),
    ("models__0__last_event__seq", INT64_MAX, INT64_MAX + 1),
    ("models__0__last_event__release", MAX_RELEASE, MAX_RELEASE + 1),
    ("models__0__last_event__from_release", 0, -2),
    ("models__0__last_event__ts", NOW, math.inf),
    ("cpu_percent", 102_400.0, 102_401.0),
    ("mem_rss_mb", 1e9, 2e9),
    ("mem_percent", 100.0, 100.1),
    ("disk_free_mb", 0.0, -1.0),
    ("temperature_c", -273.15, -274.0),
    ("uptime_s", 0.0, -1.0),
    ("dropped", INT64_MAX, -1),
    ("spooled", 0, INT64_MAX + 1),
    ("device_cpu_percent", 100.0, 101.0),
]


@pytest.mark.parametrize(("path", "ok", "bad"), HEALTH_BOUNDS,
                         ids=[f"{p}={b!r}"[:60] for p, _, b in HEALTH_BOUNDS])
def test_each_health_figure_is_bounded(path: str, ok: Any, bad: Any) -> None:
    check(health(**{path: ok}), now=NOW)
    with pytest.raises(ClaimRefused) as refused:
        check(health(**{path: bad}), now=NOW)
    field = path.replace("models__0__", "models[0].").replace("__", ".")
    assert refused.value.field.startswith(field)  # "models[0].held[]" for an element
    assert str(refused.value).startswith(refused.value.field + " = ")
    assert refused.value.bound


@pytest.mark.parametrize(("path", "ok", "bad"), [b for b in HEALTH_BOUNDS if "shadow" not in b[0]],
                         ids=[f"{p}={b!r}"[:60] for p, _, b in HEALTH_BOUNDS if "shadow" not in p])
def test_the_fast_pass_holds_the_same_bounds(path: str, ok: Any, bad: Any) -> None:
    """``_health_within`` (the ingester's fast pass) accepts what ``_check_health`` accepts and
    passes everything else to it; a shadow always goes to ``_check_health``."""
    assert _health_within(health(models__0__shadow=None, **{path: ok}), DEFAULT_BOUNDS, NOW)
    assert not _health_within(health(models__0__shadow=None, **{path: bad}), DEFAULT_BOUNDS, NOW)
    assert not _health_within(health(), DEFAULT_BOUNDS, NOW)  # with a shadow


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_figures_are_refused(value: float) -> None:
    for path in ("interval_s", "models__0__latency_p95_ms", "models__0__drift", "cpu_percent", "ts",
                 "models__0__drift_inputs__image", "temperature_c", "models__0__last_event__ts"):
        with pytest.raises(ClaimRefused, match="finite"):
            check(health(**{path: value}), now=NOW)
        assert not _health_within(health(models__0__shadow=None, **{path: value}), DEFAULT_BOUNDS, NOW)


def test_the_issue_s_negative_counts_are_refused_with_the_figures() -> None:
    with pytest.raises(ClaimRefused) as refused:
        check(health(models__0__inferences=10, models__0__errors=4119), now=NOW)
    assert refused.value.field == "models[0].errors"
    assert str(refused.value) == "models[0].errors = 4119: at most the window's inferences"
    with pytest.raises(ClaimRefused, match=r"inferences = 100001: at most 10000/s x interval_s 10 = 100000"):
        check(health(models__0__inferences=100_001), now=NOW)


def test_text_with_control_characters_and_too_many_models_are_refused() -> None:
    with pytest.raises(ClaimRefused, match="printable"):
        check(health(models__0__name="a\x00b"), now=NOW)
    many = msgspec.to_builtins(health())
    many["models"] = [dict(many["models"][0], name=f"m{i}") for i in range(33)]
    with pytest.raises(ClaimRefused, match="at most 32 models"):
        check(msgspec.convert(many, messages.Health), now=NOW)


def test_events_and_status_are_bounded() -> None:
    event = messages.Event(v=1, device_id="d1", seq=INT64_MAX, ts=NOW, model="m" * 64, kind="committed",
                           release=MAX_RELEASE, from_release=0, message="x" * 2000, session="s")
    check(event, now=NOW)
    for field, bad in (("seq", INT64_MAX + 1), ("model", "m" * 65), ("release", -1),
                       ("from_release", MAX_RELEASE + 1), ("message", "a\x00"), ("ts", math.nan)):
        with pytest.raises(ClaimRefused) as refused:
            check(msgspec.structs.replace(event, **{field: bad}), now=NOW)
        assert refused.value.field == field
    status = messages.Status(v=1, device_id="d1", online=True, ts=NOW, agent_version="v" * 257)
    with pytest.raises(ClaimRefused, match="agent_version"):
        check(status, now=NOW)


# -- the sequence window --------------------------------------------------------------------
def test_window_accepts_each_seq_once_in_any_order_within_it() -> None:
    w = SeqWindow()
    assert w.admit("s1", 10, NOW)
    assert not w.admit("s1", 10, NOW)  # a redelivery
    assert w.admit("s1", 12, NOW + 2)
    assert w.admit("s1", 11, NOW + 1)  # late, within the window
    assert not w.admit("s1", 11, NOW + 1)
    assert w.admit("s1", 12 + WINDOW_BITS + 5, NOW + 3)  # a jump (a crash skips numbers)
    assert not w.admit("s1", 12, NOW + 2)  # now below the window: refused
    restored = SeqWindow.load(w.session, w.high, w.missing_bytes(), w.last_ts)
    assert restored == w
    assert not restored.admit("s1", 12 + WINDOW_BITS + 5, NOW + 3)


def test_an_in_order_stream_keeps_an_empty_bitmap_and_skipped_numbers_stay_acceptable() -> None:
    w = SeqWindow()
    for seq in range(5000):
        assert w.admit("s", seq, NOW + seq)
    assert w.missing_bytes() == b""  # what a device's row holds while its messages arrive in order
    assert w.admit("s", 6000, NOW + 6000)  # a crash reserved ahead: 5000 .. 5999 never sent
    assert len(w.missing_bytes()) == 1000 // 8
    assert w.admit("s", 5500, NOW + 5500) and not w.admit("s", 5500, NOW + 5500)
    first = SeqWindow()
    assert first.admit("t", 1000, NOW)  # first heard mid-run (the fleet upgraded)
    assert first.admit("t", 990, NOW - 10)  # reordered just below it: new
    assert not first.admit("t", 900, NOW - 100)  # stored before the fleet kept windows


def test_a_new_session_replaces_the_old_one_only_with_a_later_ts() -> None:
    w = SeqWindow()
    assert w.admit("old", 500, NOW)
    assert w.admit("new", 0, NOW + 10)  # the counter started over (wiped state)
    assert w.admit("new", 1, NOW + 11)
    assert not w.admit("old", 501, NOW + 1)  # the old session's messages, replayed or late
    assert not w.admit("new", 0, NOW + 10)


def test_an_older_agent_without_session_starts_over_with_a_later_ts_only() -> None:
    w = SeqWindow()
    assert w.admit("", 10_000, NOW)
    assert not w.admit("", 5, NOW - 100)  # below the window, older: a replay
    assert w.admit("", 5, NOW + 100)  # below the window, later: its counter started over
    assert not w.admit("", 5, NOW + 100)


# -- budgets ----------------------------------------------------------------------------------
def test_budgets_refuse_past_the_burst_and_refill_with_time() -> None:
    budgets = DeviceBudgets(Budget(messages_per_min=60, messages_burst=3, bytes_per_min=6000,
                                   bytes_burst=1000, rows_per_min=60, rows_burst=2))
    t = time.time()
    for _ in range(3):
        budgets.take_message("d1", 100, t)
    with pytest.raises(BudgetExceeded, match="messages budget: needs 1, 0 left"):
        budgets.take_message("d1", 100, t)
    budgets.take_message("d2", 100, t)  # another device is not affected
    budgets.take_message("d1", 100, t + 1.0)  # one message a second refills
    with pytest.raises(BudgetExceeded) as refused:
        budgets.take_message("d2", 2000, t + 1.0)
    assert refused.value.budget == "bytes"
    budgets.take_rows("d1", 2, t)
    with pytest.raises(BudgetExceeded, match="rows budget"):
        budgets.take_rows("d1", 1, t)


def test_a_rate_of_zero_turns_a_budget_off() -> None:
    budgets = DeviceBudgets(Budget(messages_per_min=0, messages_burst=0, bytes_per_min=0, bytes_burst=0))
    for _ in range(100):
        budgets.take_message("d1", 10**6, 0.0)
