"""Whether merging requests pays for a model: measured once at load, decided here.

Batching only helps where a run of n rows costs less than n runs of one row: dense layers
whose weights stream from memory once per run (an MLP: 3.4 ms a row alone, 0.9 ms a row in
eights). Convolutions and sequence layers on a CPU often cost as much per row, or more, in a
batch (PP-OCRv4 rec: 24.4 ms alone, 35.3 ms a row in eights), and then merging only adds
the concatenation, the split and the wait: batching must be off for them.

The calibration (``measure_gain``) times a run of one row and a run of ``rows`` rows on the
bundle's golden inputs, alternating, and keeps the fastest of each (the least disturbed by
other work on the device); ``decide`` is pure: the figures in, the reason to stay unbatched
(or None) out, so it is tested on figures, not on timings.

    gain = rows x single_s / batched_s     (throughput of merged runs over one-by-one runs)
    gain >= MIN_GAIN  -> merge;  else  -> batching off, with the figures in the reason

Once merging is on, ``LiveGain`` keeps watching in service: the time per row of runs of one
request against that of merged runs (moving averages). When merged runs prove no cheaper
per row than single ones over at least LIVE_MIN_RUNS of each, batching is turned off too
(never back on: a release's runs do not get cheaper by themselves).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import numpy as np

MIN_GAIN = 1.2  # merged runs must beat one-by-one runs by this much to pay for merging
CALIBRATION_ROWS = 4  # rows of the batched run (at most the policy's max_batch_size)
CALIBRATION_PAIRS = 3  # timed (single, batched) pairs


class Calibration(msgspec.Struct, frozen=True):
    """What a run of one row and a run of ``rows`` rows took (the fastest of a few each)."""

    rows: int
    single_s: float
    batched_s: float

    @property
    def gain(self) -> float:
        """Throughput of merged runs over one-by-one runs (1.0: no gain)."""
        return self.rows * self.single_s / self.batched_s if self.batched_s > 0 else float("inf")

    def summary(self) -> dict[str, float | int]:
        return {"rows": self.rows, "single_ms": round(self.single_s * 1000, 3),
                "batched_ms": round(self.batched_s * 1000, 3), "gain": round(self.gain, 2)}


def decide(calibration: Calibration, min_gain: float = MIN_GAIN) -> str | None:
    """Why the model should run unbatched (None: merging pays)."""
    if calibration.rows < 2:
        return "the calibration ran a single row: no batch to compare"
    gain = calibration.gain
    if gain >= min_gain:
        return None
    per_row_ms = calibration.batched_s / calibration.rows * 1000
    return (f"batching does not pay for this model: {calibration.rows} rows in one run take "
            f"{per_row_ms:.3f} ms a row against {calibration.single_s * 1000:.3f} ms alone "
            f"(gain {gain:.2f}x, below {min_gain:g}x); runtime.batching = \"on\" forces it")


LIVE_MIN_RUNS = 32  # runs of each kind seen in service before the live figures are trusted
LIVE_ALPHA = 0.1  # weight of the newest run in the moving averages


class LiveGain:
    """Seconds per row of single-request runs and of merged runs seen in service, as moving
    averages. Called from several workers: a lost update only delays the verdict."""

    __slots__ = ("batched", "n_batched", "n_single", "single")

    def __init__(self) -> None:
        self.single = self.batched = 0.0
        self.n_single = self.n_batched = 0

    def note(self, seconds: float, rows: int, merged: bool) -> None:
        per_row = seconds / max(rows, 1)
        if merged:
            old, self.n_batched = self.batched, self.n_batched + 1
            self.batched = per_row if self.n_batched == 1 else old + LIVE_ALPHA * (per_row - old)
        else:
            old, self.n_single = self.single, self.n_single + 1
            self.single = per_row if self.n_single == 1 else old + LIVE_ALPHA * (per_row - old)

    def verdict(self) -> str | None:
        """Why merging should stop (None: keep it, or too few runs yet to say)."""
        if self.n_single < LIVE_MIN_RUNS or self.n_batched < LIVE_MIN_RUNS or self.batched < self.single:
            return None
        return (f"batching did not pay in service: merged runs took {self.batched * 1000:.3f} ms a row "
                f"against {self.single * 1000:.3f} ms a row alone (moving averages over "
                f"{self.n_batched} merged and {self.n_single} single runs)")


Run = Callable[[dict[str, np.ndarray]], object]


def measure_gain(run: Run, row: dict[str, np.ndarray], rows: int,
                 pairs: int = CALIBRATION_PAIRS) -> Calibration:
    """Time ``run`` on ``row`` (one row per input) and on ``rows`` copies of it merged."""
    batch = {k: np.concatenate([v] * rows) for k, v in row.items()}
    run(batch)  # the first run of a new shape allocates: not timed
    single, batched = [], []
    clock = time.perf_counter
    for _ in range(pairs):
        t0 = clock()
        run(row)
        t1 = clock()
        run(batch)
        t2 = clock()
        single.append(t1 - t0)
        batched.append(t2 - t1)
    return Calibration(rows, min(single), min(batched))
