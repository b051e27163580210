"""Thread-safe inference counters: a health window and totals, with latency quantiles,
and (when the release has a baseline) input drift scores.

Cheap on the hot path: one lock, two integer increments and two bounded deque appends; with
drift, a copy of at most DRIFT_SAMPLE values per input per request.

Besides the health window's latencies, the latest RECENT_LATENCIES are kept across windows:
the trial of the next release compares its own with them (agent.update.gating.judge_trial).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Mapping

import msgspec
import numpy as np


class MetricsSnapshot(msgspec.Struct, frozen=True):
    inferences: int
    errors: int
    total_inferences: int
    total_errors: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    drift: float | None = None  # the highest PSI over the inputs, None without a score
    drift_inputs: dict[str, float] | None = None  # PSI per input with enough values


RECENT_LATENCIES = 512


class Metrics:
    def __init__(self, max_samples: int = 4096) -> None:
        self._lock = threading.Lock()
        self._samples: deque[float] = deque(maxlen=max_samples)
        self._recent: deque[float] = deque(maxlen=RECENT_LATENCIES)  # never reset by a window
        self._window = 0
        self._window_errors = 0
        self._total = 0
        self._total_errors = 0
        self.drift: DriftTracker | None = None  # set when the release has a baseline

    def observe(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Account a request's inputs for drift (a no-op without a baseline)."""
        drift = self.drift
        if drift is not None:
            drift.observe(inputs)

    def record(self, latency_s: float, *, error: bool = False) -> None:
        with self._lock:
            self._window += 1
            self._total += 1
            if error:
                self._window_errors += 1
                self._total_errors += 1
            else:
                self._samples.append(latency_s)
                self._recent.append(latency_s)

    def snapshot(self, *, reset_window: bool = False) -> MetricsSnapshot:
        with self._lock:
            samples = list(self._samples)
            snap = (self._window, self._window_errors, self._total, self._total_errors)
            if reset_window:
                self._samples.clear()
                self._window = self._window_errors = 0
        p50 = p95 = None
        if samples:
            q = np.quantile(np.asarray(samples), [0.5, 0.95]) * 1000.0
            p50, p95 = round(float(q[0]), 3), round(float(q[1]), 3)
        drift_inputs = self.drift.scores(reset=reset_window) if self.drift is not None else {}
        return MetricsSnapshot(
            *snap, latency_p50_ms=p50, latency_p95_ms=p95,
            drift=max(drift_inputs.values()) if drift_inputs else None,
            drift_inputs=drift_inputs or None,
        )

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self._total, self._total_errors

    def recent_latencies(self) -> list[float]:
        """The latest RECENT_LATENCIES latencies of successful requests, in seconds."""
        with self._lock:
            return list(self._recent)


# -- drift: live inputs against the bundle's baseline ----------------------------------------
#
# The baseline (``edgefleet.baseline/v1``, written at bundle build) gives per input the
# quantiles at BASELINE_LEVELS. They cut the value axis into bins whose expected shares are
# the differences of the levels (1 %, 4 %, 20 %, 25 %, 25 %, 20 %, 4 %, 1 %). Live traffic
# is binned the same way and compared with the Population Stability Index
#     PSI = sum_i (live_i - expected_i) * ln(live_i / expected_i)
# (< 0.1 stable, 0.1-0.25 moderate, > 0.25 a large shift). On the hot path a request only
# copies up to DRIFT_SAMPLE values per input into a buffer (a strided subsample of large
# tensors, with a moving offset); binning happens once the buffer fills and at each snapshot.

BASELINE_SCHEMA = "edgefleet.baseline/v1"
BASELINE_LEVELS = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DRIFT_SAMPLE = 64  # values per input per request
DRIFT_BUFFER = 4096  # values per input buffered before they are binned
DRIFT_MIN_VALUES = 200  # values per input in a window before its PSI is reported
PSI_FLOOR = 1e-4  # share used for an empty bin, so PSI stays finite


class BaselineInput(msgspec.Struct):
    count: int
    mean: float
    std: float
    quantiles: dict[str, float]


class Baseline(msgspec.Struct):
    schema: str
    inputs: dict[str, BaselineInput]


def parse_baseline(data: bytes, max_bytes: int = 1 << 20) -> Baseline:
    """Decode a bundle's baseline file; ValueError naming what is wrong."""
    if len(data) > max_bytes:
        raise ValueError(f"baseline is {len(data)} bytes, more than {max_bytes}")
    try:
        doc = msgspec.json.decode(data, type=Baseline)
    except msgspec.DecodeError as exc:
        raise ValueError(f"baseline is invalid: {exc}") from None
    if doc.schema != BASELINE_SCHEMA:
        raise ValueError(f"baseline schema {doc.schema!r}, expected {BASELINE_SCHEMA!r}")
    return doc


def baseline_bins(stats: BaselineInput) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges, expected shares) from one input's quantiles; None when they are unusable.

    Equal quantiles (a value that fills several percent, e.g. zero padding) merge their
    bins: an edge's cumulative share is the highest level that maps to it.
    """
    try:
        pairs = sorted((float(level), float(value)) for level, value in stats.quantiles.items())
    except ValueError:
        return None
    pairs = [(lv, v) for lv, v in pairs if 0.0 < lv < 1.0 and np.isfinite(v)]
    if not pairs or any(b[1] < a[1] for a, b in itertools.pairwise(pairs)):
        return None
    edges: list[float] = []
    cdf: list[float] = []
    for level, value in pairs:
        if edges and value == edges[-1]:
            cdf[-1] = level
        else:
            edges.append(value)
            cdf.append(level)
    shares = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    return np.asarray(edges, dtype=np.float64), shares


def psi(counts: np.ndarray, expected: np.ndarray) -> float:
    live = np.maximum(counts / max(int(counts.sum()), 1), PSI_FLOOR)
    want = np.maximum(expected, PSI_FLOOR)
    return float(np.sum((live - want) * np.log(live / want)))


class _InputDrift:
    __slots__ = ("counts", "edges", "expected", "fill", "values")

    def __init__(self, edges: np.ndarray, expected: np.ndarray) -> None:
        self.edges = edges
        self.expected = expected
        self.counts = np.zeros(len(edges) + 1, dtype=np.int64)
        self.values = np.empty(DRIFT_BUFFER, dtype=np.float64)
        self.fill = 0

    def flush(self) -> None:
        if self.fill:
            # Bin i holds (edges[i-1], edges[i]]: values at a quantile count below it.
            idx = np.searchsorted(self.edges, self.values[: self.fill], side="left")
            self.counts += np.bincount(idx, minlength=len(self.counts))
            self.fill = 0


class DriftTracker:
    """Per-input PSI of a health window's inputs against the release's baseline."""

    def __init__(self, baseline: Baseline, *, sample: int = DRIFT_SAMPLE,
                 min_values: int = DRIFT_MIN_VALUES) -> None:
        self.sample = sample
        self.min_values = min_values
        self._lock = threading.Lock()
        self._tick = 0
        self._inputs: dict[str, _InputDrift] = {}
        for name, stats in baseline.inputs.items():
            bins = baseline_bins(stats)
            if bins is not None:
                self._inputs[name] = _InputDrift(*bins)

    @property
    def inputs(self) -> list[str]:
        return sorted(self._inputs)

    def observe(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Take a subsample of one request's inputs (the hot path: a copy of <= sample values)."""
        with self._lock:
            self._tick += 1
            for name, state in self._inputs.items():
                arr = inputs.get(name)
                if arr is None or arr.dtype.kind not in "biuf":
                    continue
                flat = arr.reshape(-1)
                n = flat.size
                if n > self.sample:
                    step = n // self.sample
                    flat = flat[self._tick % step :: step][: self.sample]
                    n = flat.size
                if state.fill + n > DRIFT_BUFFER:
                    state.flush()
                state.values[state.fill : state.fill + n] = flat
                state.fill += n

    def scores(self, *, reset: bool = True) -> dict[str, float]:
        """PSI per input with at least ``min_values`` values in the window."""
        out: dict[str, float] = {}
        with self._lock:
            for name, state in self._inputs.items():
                state.flush()
                if int(state.counts.sum()) < self.min_values:
                    continue  # a quiet window carries its values into the next one
                out[name] = round(psi(state.counts, state.expected), 4)
                if reset:
                    state.counts[:] = 0
        return out
