"""When a staged release may be activated (inside its activation window, with no update lock),
and whether a release on trial is committed or rolled back (``judge_trial``, pure).

Rules:
- download, verification and staging happen at any time (a metered link has its own
  download window, agent.update.fetch); only the step STAGED -> SMOKE_TESTING (load, golden
  vectors, swap) waits here, so a device never loads a second model outside its window;
- the window is the rollout's (desired state ``activation_window``) when it sets one, else
  the device's ``update.activation_window``; none: any time;
- while any local application holds an update lock (agent.update.locks), activation waits;
- offline installs (``edgefleet-agent install FILE``, an operator at the device) are not gated.

``waiting_for`` answers None (go) or the reason, phrased for ``edgefleet-agent status`` and
the ``waiting`` field of health telemetry. Pure but for the clock and the lock table it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from agent.update.locks import LockTable
from agent.update.window import UpdateWindow
from shared.telemetry.vocabulary import ReasonCode


class ActivationGate:
    def __init__(
        self,
        *,
        window: UpdateWindow | None = None,
        locks: LockTable | None = None,
        local_now: Callable[[], datetime] = datetime.now,
        wall_now: Callable[[], float] | None = None,
    ) -> None:
        self.window = window
        self.locks = locks
        self.local_now = local_now
        self.wall_now = wall_now

    def window_of(self, target_window: str | None) -> UpdateWindow | None:
        if target_window:
            try:
                return UpdateWindow.parse(target_window)
            except ValueError:
                return self.window  # the fleet validates it; a bad one falls back to the device's
        return self.window

    def waiting_for(self, target_window: str | None = None) -> str | None:
        window = self.window_of(target_window)
        if window is not None and not window.contains(self.local_now()):
            source = "rollout" if target_window and window.text == target_window.strip() else "device"
            return f"waiting for the activation window {window.text} local time ({source})"
        if self.locks is not None:
            held = self.locks.held()
            if held:
                now = self.locks.clock()
                wall = self.wall_now() if self.wall_now is not None else datetime.now(UTC).timestamp()
                names = ", ".join(
                    f"'{x.holder}' until "
                    f"{datetime.fromtimestamp(wall + x.remaining(now), UTC).strftime('%H:%M:%S')} UTC"
                    for x in held[:5]
                )
                more = f" and {len(held) - 5} more" if len(held) > 5 else ""
                return f"waiting for the update lock held by {names}{more}"
        return None

    def wake_in(self, target_window: str | None = None) -> float | None:
        """Seconds until the answer may change by itself (window opens, a lease runs out)."""
        times: list[float] = []
        window = self.window_of(target_window)
        if window is not None:
            until = window.seconds_until_open(self.local_now())
            if until > 0:
                times.append(until)
        if self.locks is not None:
            now = self.locks.clock()
            times.extend(x.remaining(now) for x in self.locks.held())
        return min(times) if times else None


# -- the trial's judgement ---------------------------------------------------------------------
#
# When a release's trial time is up the device judges it on its own figures, with or without
# the fleet: its error rate against ``trial_max_error_rate`` (``trial_errors``), then its p95
# latency against the previous release's on this same device (``trial_latency``). Latency is
# judged on evidence, as the fleet's gates are: distribution-free bounds on each p95 from the
# order statistics of the recorded latencies, one-sided at 99 % (TRIAL_CONFIDENCE_Z); the release
# fails only when the *lower* bound of its p95 passes ``max_latency_ratio`` times the *upper*
# bound of the previous release's, by at least ``min_latency_delta_ms`` (a model served in
# microseconds is not rolled back for a busy CPU during its trial), and with at least
# ``min_latency_samples`` on each side.
# A trial without the previous release's latencies (a first install, a restart in trial) is
# not judged on latency.

TRIAL_CONFIDENCE_Z = 2.326  # one-sided 99 %
TRIAL_QUANTILE = 0.95


class TrialLimits(msgspec.Struct, frozen=True):
    max_error_rate: float = 0.5
    min_inferences: int = 0
    max_latency_ratio: float | None = 2.0  # None: latency is not judged
    min_latency_samples: int = 20
    min_latency_delta_ms: float = 2.0  # slower by less than this is never judged slower


class TrialFigures(msgspec.Struct, frozen=True):
    """What the device measured: the trial's counts and latencies (seconds) and the
    previous release's latencies just before the switch."""

    inferences: int
    errors: int
    latencies: Sequence[float] = ()
    previous_latencies: Sequence[float] = ()


class TrialJudgement(msgspec.Struct, frozen=True):
    """``reason`` None: commit; else the reason code the trial rolls back with."""

    reason: ReasonCode | None
    message: str


def quantile_bounds(values: Sequence[float], q: float = TRIAL_QUANTILE,
                    z: float = TRIAL_CONFIDENCE_Z) -> tuple[float, float]:
    """(lower, upper) distribution-free bounds of the ``q`` quantile: order statistics whose
    ranks are the binomial count's normal bounds (clamped to the smallest and largest value)."""
    ordered = sorted(values)
    n = len(ordered)
    centre, spread = n * q, z * math.sqrt(n * q * (1 - q))
    lo = min(n - 1, max(0, math.floor(centre - spread) - 1))
    hi = min(n - 1, max(0, math.ceil(centre + spread) - 1))
    return ordered[lo], ordered[hi]


def judge_trial(f: TrialFigures, limits: TrialLimits) -> TrialJudgement:
    """Commit, or roll back with ``trial_errors`` or ``trial_latency``; the message carries
    the figures either way."""
    rate = f.errors / f.inferences if f.inferences else 0.0
    errors = f"error rate {rate:.3f} ({f.errors}/{f.inferences} inferences), bound {limits.max_error_rate}"
    if f.inferences >= limits.min_inferences and f.inferences > 0 and rate > limits.max_error_rate:
        return TrialJudgement(ReasonCode.TRIAL_ERRORS, errors)
    ratio = limits.max_latency_ratio
    n_new, n_old = len(f.latencies), len(f.previous_latencies)
    if ratio is None:
        return TrialJudgement(None, errors)
    if min(n_new, n_old) < max(limits.min_latency_samples, 1):
        return TrialJudgement(None, f"{errors}; latency not judged ({n_new} trial and {n_old} previous "
                                    f"samples, needs {limits.min_latency_samples} each)")
    new_p95 = _p95_ms(f.latencies)
    old_p95 = _p95_ms(f.previous_latencies)
    new_low, _ = quantile_bounds(f.latencies)
    _, old_high = quantile_bounds(f.previous_latencies)
    latency = (f"p95 {new_p95:.2f} ms vs {old_p95:.2f} ms on the previous release "
               f"(99% bounds: trial >= {new_low * 1000:.2f} ms, previous <= {old_high * 1000:.2f} ms; "
               f"{n_new} and {n_old} samples), bound x{ratio:g}")
    if new_low > ratio * old_high and (new_low - old_high) * 1000 >= limits.min_latency_delta_ms:
        return TrialJudgement(ReasonCode.TRIAL_LATENCY, latency)
    return TrialJudgement(None, f"{errors}; {latency}")


def _p95_ms(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(TRIAL_QUANTILE * len(ordered)) - 1)] * 1000.0
