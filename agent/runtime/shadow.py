"""Shadow evaluation: a candidate release runs beside the serving one on a sample of live
requests, off the request's critical path, and its outputs are compared with the serving
release's outputs on the same inputs.

Rules:
- the request path only decides whether to sample (one call at a random position in each
  block of ``1 / sample_rate`` calls: ``Sampler``) and does a ``put_nowait`` on a bounded
  queue; it never waits for the candidate. One worker thread runs the candidate;
- a sample is dropped, and counted, when the queue is full (``dropped_queue``) or when the
  CPU budget is spent (``dropped_budget``): the worker may be busy at most
  ``max_busy_fraction`` of wall time (a token bucket: the budget grows by that fraction of
  each elapsed second, up to one second's worth, and each candidate run spends its time);
- comparison by output kind (vocabulary of ``fleet.bundles.quantize``): the manifest's first
  output, when it is float with rank >= 2 and a fixed last axis > 1, holds class scores and
  a sample *agrees* when the argmax of every row matches (``metric = "argmax"``); a model
  without such an output agrees when every output is within the bundle's golden tolerance
  (``metric = "tolerance"``, the smoke test's check). Max abs error and cosine (worst output)
  are measured for every float output either way;
- a candidate that fails on a sampled input counts as a sample that does not agree
  (``errors``);
- figures are cumulative since the candidate was loaded; latency quantiles cover the latest
  ``LATENCY_SAMPLES`` samples.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import msgspec
import numpy as np

from agent.runtime.base import Session
from shared.bundle.manifest import Manifest

if TYPE_CHECKING:  # the message Structs are imported with the first report, not the agent
    from shared.telemetry.messages import ShadowHealth

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 1024
DEFAULT_QUEUE_SIZE = 8
DEFAULT_SAMPLE_RATE = 0.1
DEFAULT_MAX_BUSY_FRACTION = 0.25


class ShadowPolicy(msgspec.Struct, frozen=True):
    sample_rate: float = DEFAULT_SAMPLE_RATE  # share of requests also run on the candidate
    max_busy_fraction: float = DEFAULT_MAX_BUSY_FRACTION  # of wall time, for the worker
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate {self.sample_rate} must be in (0, 1]")
        if not 0.0 < self.max_busy_fraction <= 1.0:
            raise ValueError(f"max_busy_fraction {self.max_busy_fraction} must be in (0, 1]")
        if self.queue_size < 1:
            raise ValueError(f"queue_size {self.queue_size} must be >= 1")


# -- pure parts: sampling, budget, comparison -------------------------------------------------


class Sampler:
    """Take ``rate`` of the calls at positions no periodic traffic can align with.

    The calls are cut into consecutive blocks and one call at a uniformly random position in
    each block is taken (jittered systematic sampling). A block holds ``1 / rate`` calls
    when that is whole (0.1: blocks of 10, one sample in each, the count exact to one);
    otherwise ``floor(1 / rate)`` or one more, drawn so the mean is ``1 / rate`` (0.3:
    3 or 4 calls, 4 a third of the time). Every call is taken with probability ``rate`` in
    the long run, whatever its position: traffic of any period has all its phases sampled
    alike (an application cycling through five cameras has each camera shadowed a fifth of
    the time, on every device), where a strict every-10th sampler would see one camera only.
    ``seed`` makes the draws reproducible (tests); by default the OS seeds the generator.
    """

    def __init__(self, rate: float, *, seed: int | None = None) -> None:
        import random  # with the first shadow run, not with the agent

        self.rate = rate
        span = 1.0 / rate
        self._short = max(1, math.floor(span + 1e-9))
        self._long_share = min(1.0, max(0.0, span - self._short))  # of blocks one call longer
        self._rng = random.Random(seed)
        self._left = 0  # calls left in the current block
        self._pick = 0  # the value of _left at which the block's call is taken
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left == 0:
                length = self._short + (self._rng.random() < self._long_share)
                self._left = length
                self._pick = self._rng.randrange(length)
            self._left -= 1
            return self._left == self._pick


class BusyBudget:
    """CPU budget of the shadow worker as a token bucket of seconds.

    Tokens grow by ``fraction`` per second of wall time, capped at ``fraction * window_s``;
    a run spends its duration (tokens may go below zero after a long run, which blocks new
    samples until the debt is paid). Over any interval T the worker is busy at most
    ``fraction * (T + window_s)`` plus one run.
    """

    def __init__(self, fraction: float, *, window_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction = fraction
        self.cap = fraction * window_s
        self.clock = clock
        self._tokens = self.cap
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.cap, self._tokens + (now - self._last) * self.fraction)
        self._last = now

    def allows(self) -> bool:
        with self._lock:
            self._refill()
            return self._tokens > 0.0

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._refill()
            self._tokens -= seconds


def class_score_output(manifest: Manifest) -> str | None:
    """The output holding class scores (argmax compared), or None: the build's rule for
    ``class_scores=0``: the first output, float, rank >= 2, a fixed last axis > 1."""
    first = manifest.outputs[0]
    last = first.shape[-1] if first.shape else None
    if first.dtype.startswith("float") and len(first.shape) >= 2 and isinstance(last, int) and last > 1:
        return first.name
    return None


class Comparison(msgspec.Struct, frozen=True):
    agrees: bool
    max_abs_error: float | None  # worst float output; None without float outputs
    cosine: float | None  # worst float output


def compare_outputs(
    manifest: Manifest,
    current: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    class_output: str | None,
) -> Comparison:
    """Compare the candidate's outputs with the serving release's on one request."""
    tol = manifest.golden_tolerance
    agrees = True
    max_abs: float | None = None
    cos_min: float | None = None
    for spec in manifest.outputs:
        cur, cand = current.get(spec.name), candidate.get(spec.name)
        if cur is None or cand is None or cur.shape != cand.shape:
            return Comparison(False, None, None)
        if (spec.name == class_output and cur.ndim >= 2 and cur.shape[-1] > 1
                and not np.array_equal(cur.argmax(-1), cand.argmax(-1))):
            agrees = False
        if cur.dtype.kind not in "fiu" or cur.size == 0:
            if class_output is None and not np.array_equal(cur, cand):
                agrees = False
            continue
        a, b = cur.astype(np.float64), cand.astype(np.float64)
        diff = float(np.max(np.abs(a - b)))
        max_abs = diff if max_abs is None else max(max_abs, diff)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        cos = 1.0 if na == 0.0 and nb == 0.0 else float(np.dot(a.ravel(), b.ravel()) / max(na * nb, 1e-12))
        cos_min = cos if cos_min is None else min(cos_min, cos)
        if class_output is None and not np.allclose(b, a, atol=tol.atol, rtol=tol.rtol):
            agrees = False
    return Comparison(agrees, max_abs, cos_min)


class ShadowStats:
    """Cumulative figures of one candidate; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.offered = 0
        self.samples = 0
        self.agreed = 0
        self.errors = 0
        self.dropped_queue = 0
        self.dropped_budget = 0
        self.max_abs_error: float | None = None
        self.cosine_min: float | None = None
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._cand: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._cur: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def drop(self, *, budget: bool) -> None:
        with self._lock:
            if budget:
                self.dropped_budget += 1
            else:
                self.dropped_queue += 1

    def add(self, cmp: Comparison | None, candidate_s: float, current_s: float) -> None:
        """One compared sample (``cmp`` None: the candidate failed on it)."""
        with self._lock:
            self.samples += 1
            self.busy_s += candidate_s
            if cmp is None:
                self.errors += 1
                return
            self.agreed += int(cmp.agrees)
            if cmp.max_abs_error is not None:
                self.max_abs_error = max(self.max_abs_error or 0.0, cmp.max_abs_error)
            if cmp.cosine is not None:
                self.cosine_min = cmp.cosine if self.cosine_min is None else min(self.cosine_min, cmp.cosine)
            self._cand.append(candidate_s)
            self._cur.append(current_s)

    def health(self, manifest: Manifest, metric: str) -> ShadowHealth:
        from shared.telemetry.messages import ShadowHealth

        with self._lock:
            cand, cur = list(self._cand), list(self._cur)
            wall = max(time.monotonic() - self.started, 1e-6)
            return ShadowHealth(
                release=manifest.release,
                version=manifest.version,
                metric=metric,
                samples=self.samples,
                agreed=self.agreed,
                errors=self.errors,
                dropped_queue=self.dropped_queue,
                dropped_budget=self.dropped_budget,
                agreement=round(self.agreed / self.samples, 6) if self.samples else None,
                max_abs_error=None if self.max_abs_error is None else round(self.max_abs_error, 6),
                cosine_min=None if self.cosine_min is None else round(self.cosine_min, 6),
                candidate_p95_ms=_p95_ms(cand),
                current_p95_ms=_p95_ms(cur),
                busy_fraction=round(self.busy_s / wall, 4),
            )


def _p95_ms(values: list[float]) -> float | None:
    return round(float(np.quantile(np.asarray(values), 0.95)) * 1000.0, 3) if values else None


# -- the runner: queue + one worker thread -----------------------------------------------------


class Candidate(Protocol):
    """What the runner needs of a loaded release (agent.runtime.host.LoadedModel)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def digest(self) -> str: ...

    @property
    def session(self) -> Session: ...


class ShadowRunner:
    """Runs one candidate release of a model on sampled requests, in one worker thread."""

    def __init__(self, candidate: Candidate, policy: ShadowPolicy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.candidate = candidate
        self.manifest = candidate.manifest
        self.digest = candidate.digest
        self._session = candidate.session
        self.policy = policy
        self.sampler = Sampler(policy.sample_rate)
        self.budget = BusyBudget(policy.max_busy_fraction, clock=clock)
        self.stats = ShadowStats()
        self.class_output = class_score_output(self.manifest)
        self.metric = "argmax" if self.class_output else "tolerance"
        self._queue: queue.Queue[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float] | None] = (
            queue.Queue(maxsize=policy.queue_size)
        )
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=f"shadow-{self.manifest.name}", daemon=True)
        self._worker.start()

    @property
    def release(self) -> int:
        return self.manifest.release

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              current_s: float) -> bool:
        """The request path: sample or not, queue without waiting; True when queued."""
        if self._closed or not self.sampler.take():
            return False
        if not self.budget.allows():
            self.stats.drop(budget=True)
            return False
        try:
            self._queue.put_nowait((inputs, outputs, current_s))
        except queue.Full:
            self.stats.drop(budget=False)
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._one(*item)
            finally:
                self._queue.task_done()

    def _one(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
             current_s: float) -> None:
        t0 = time.perf_counter()
        try:
            got = self._session.run(dict(inputs))
        except Exception as exc:
            elapsed = time.perf_counter() - t0
            log.debug("shadow %s r%s failed on a sample: %s", self.manifest.name, self.release, exc)
            self.budget.spend(elapsed)
            self.stats.add(None, elapsed, current_s)
            return
        elapsed = time.perf_counter() - t0
        self.budget.spend(elapsed)
        try:
            cmp = compare_outputs(self.manifest, outputs, got, class_output=self.class_output)
        except Exception:
            log.exception("shadow comparison failed")
            cmp = Comparison(False, None, None)
        self.stats.add(cmp, elapsed, current_s)

    def health(self) -> ShadowHealth:
        return self.stats.health(self.manifest, self.metric)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is empty (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while True:  # make room for the stop marker: pending samples are dropped
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                break
        self._queue.put(None)
        self._worker.join(timeout=10)
