"""Per-model request scheduling with dynamic batching.

Every request of an active model goes through that model's scheduler:

- a request is queued; up to ``workers`` threads (started on demand, gone after an idle
  spell) take requests from the queue and run them on the model's session;
- when the model is batchable, a worker merges the request it takes with compatible
  requests behind it (same input names, trailing shapes and dtypes) up to
  ``max_batch_size`` rows, waiting up to ``max_queue_delay_s`` after the first one
  arrived for more; with the default delay of 0 it only merges what queued up while
  the workers were busy, so an idle device adds no latency;
- the merged run is split back by rows; if it fails, every request in it is run on
  its own, so only a request that fails alone gets an error (and is counted);
- a model is batchable when the first axis of every input and output is dynamic in
  the manifest and a probe shows rows do not affect each other (two rows run together
  equal the rows run apart) and outputs keep the row count. The probe (three runs) starts
  at swap time on a thread of its own, so it does not delay readiness; until it has
  answered, requests run one by one (never merged unverified). ``max_rows`` and
  ``unbatched_reason`` wait for its answer;
- with ``auto`` (the default), the probe also measures whether merging pays for the model
  (agent.runtime.batch_gain: a run of one row against a run of several); when it does not
  (gain under 1.2x: most convolutional and sequence models on a CPU), batching is off for
  it, and ``status()`` (GET /v1/models) says why, with the figures. Where it merges, the
  run times in service (``live``) may still turn it off (batch_gain.LiveGain);
- a request that finds the queue empty and a run slot free (fewer than ``workers`` runs in
  progress) runs inline, in its caller's thread: no queue, no thread hand-off (~75 us of
  every request on an idle device). Not when it could wait for companions
  (``max_queue_delay_s`` > 0 on a batchable model). Requests arriving meanwhile queue up
  as before and a worker merges them once a slot is free;
- a request still queued when its caller's timeout passes is dropped unrun; a run in
  progress cannot be interrupted (the runtimes cannot), its result is discarded (an inline
  run answers RequestTimeout when it ends past the timeout).

A scheduler belongs to one LoadedModel: after a hot swap the old scheduler finishes
what it holds on the old session and its workers exit; new requests use the new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from agent.errors import InferenceError
from agent.runtime.base import Session, concrete_shape
from agent.runtime.batch_gain import CALIBRATION_ROWS, Calibration, LiveGain, Run, decide, measure_gain
from shared.bundle.manifest import Manifest

if TYPE_CHECKING:
    from agent.runtime.host import LoadedModel

log = logging.getLogger(__name__)

IDLE_EXIT_S = 30.0


class RequestTimeout(Exception):
    """No result within the caller's timeout (the request was dropped or is still running)."""

    def __init__(self, message: str, *, started: bool) -> None:
        super().__init__(message)
        self.started = started


class BatchPolicy(msgspec.Struct, frozen=True):
    max_batch_size: int = 8
    max_queue_delay_s: float = 0.0
    workers: int = 1
    auto: bool = False  # merge only where the load-time calibration shows a gain (runtime.batching)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.workers < 1 or self.max_queue_delay_s < 0:
            raise ValueError(f"bad batch policy {self}")


def batch_axis_reason(manifest: Manifest) -> str | None:
    """Why the manifest's signature rules batching out, or None when the first axes are dynamic."""
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            if not spec.shape:
                return f"{kind} {spec.name!r} is a scalar"
            if isinstance(spec.shape[0], int):
                return f"{kind} {spec.name!r} has a fixed first axis {spec.shape[0]}"
    return None


def _golden_rows(golden: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """Two rows from the bundle's golden inputs: its first two rows, or its first row and
    that row reversed along its last axis; None when an input has no row."""
    if any(v.ndim == 0 or v.shape[0] < 1 for v in golden.values()):
        return None
    a = {k: v[0:1] for k, v in golden.items()}
    if all(v.shape[0] >= 2 for v in golden.values()):
        return a, {k: v[1:2] for k, v in golden.items()}
    return a, {k: np.ascontiguousarray(v[..., ::-1]) for k, v in a.items()}


def _probe_rows(manifest: Manifest, golden: dict[str, np.ndarray] | None = None,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two rows to probe with: from the golden inputs when the session has them (a model
    with dynamic height and width may not run on invented 1x1 rows), else made up."""
    rows = _golden_rows(golden) if golden else None
    if rows is not None:
        return rows
    a, b = {}, {}
    for spec in manifest.inputs:
        shape = concrete_shape(spec)
        a[spec.name] = np.zeros(shape, dtype=spec.dtype)
        fill = 0.5 if np.dtype(spec.dtype).kind == "f" else 1
        b[spec.name] = np.full(shape, fill, dtype=spec.dtype)
    return a, b


def _take_golden(session: Session) -> dict[str, np.ndarray] | None:
    """The golden inputs the warm-up left on the session, dropped from it: a detector's
    golden image is megabytes the device need not keep once merging is decided."""
    golden = getattr(session, "golden", None)
    if golden is not None:
        # both backends' sessions carry it; the Session protocol does not declare it (optional)
        session.golden = None  # type: ignore[attr-defined]
    return golden


def probe_batching(session: Session, manifest: Manifest) -> str | None:
    """Run two rows apart and together; return why they may not be merged, or None."""
    a, b = _probe_rows(manifest, _take_golden(session))
    return rows_independent(session, a, b)


def rows_independent(session: Session, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
    """Why rows ``a`` and ``b`` may not be merged (None: run together, they give what they
    give apart, and the outputs keep the row count)."""
    try:
        out_a, out_b = session.run(a), session.run(b)
        merged = session.run({k: np.concatenate([a[k], b[k]]) for k in a})
    except Exception as exc:
        return f"the probe run failed: {exc}"
    for name, got in merged.items():
        if got.ndim == 0 or got.shape[0] != 2:
            return f"output {name!r} has shape {list(got.shape)} for 2 rows"
        for i, single in enumerate((out_a[name], out_b[name])):
            if single.shape[1:] != got.shape[1:] or not np.allclose(
                got[i : i + 1], single, rtol=1e-3, atol=1e-5, equal_nan=True
            ):
                return f"output {name!r} of a row changes when rows run together"
    return None


class _Request:
    __slots__ = ("done", "enqueued", "error", "feeds", "key", "outputs", "rows", "state")

    def __init__(self, feeds: dict[str, np.ndarray], key: tuple[object, ...] | None, rows: int) -> None:
        self.feeds = feeds
        self.key = key
        self.rows = rows
        self.enqueued = time.perf_counter()
        self.done: threading.Event | None = None  # made when queued (an inline run needs none)
        self.state = "queued"  # queued -> running -> done, or queued -> cancelled
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: Exception | None = None


class ModelScheduler:
    def __init__(self, model: LoadedModel, policy: BatchPolicy, *, probe: bool = True,
                 idle_exit_s: float = IDLE_EXIT_S,
                 measure: Callable[[Run, dict[str, np.ndarray], int], Calibration] = measure_gain) -> None:
        self.model = model
        self.policy = policy
        self.idle_exit_s = idle_exit_s
        self._measure = measure
        self.calibration: Calibration | None = None  # set by the probe when policy.auto
        self.live = LiveGain() if policy.auto else None  # run times in service (auto only)
        self._reason: str | None = None
        self._probed = threading.Event()  # set once merging is decided
        if policy.max_batch_size <= 1:
            self._reason = "batching is off (runtime.max_batch_size = 1)"
        else:
            self._reason = batch_axis_reason(model.manifest)
        if self._reason is None and probe:
            # not a daemon: a runtime still running at interpreter exit aborts the process
            threading.Thread(target=self._probe, name=f"probe-{model.name}").start()
        else:
            _take_golden(model.session)  # no probe: nothing needs them
            self._log_unbatched()
            self._probed.set()
        # the hot paths take the plain lock (C-level enter/exit), waits go through the condition
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[_Request] = deque()
        self._alive = 0
        self._idle = 0
        self._running = 0  # runs in progress, inline or on workers (at most policy.workers)
        self._closed = False
        self.batches = 0  # merged runs of more than one request (for tests and stats)
        self.split_retries = 0  # merged runs that failed and were retried request by request

    def _probe(self) -> None:
        try:
            session = self.model.session
            a, b = _probe_rows(self.model.manifest, _take_golden(session))
            reason = rows_independent(session, a, b)
            if reason is None and self.policy.auto:
                rows = min(self.policy.max_batch_size, CALIBRATION_ROWS)
                self.calibration = self._measure(session.run, a, rows)
                reason = decide(self.calibration)
                if reason is None:
                    log.info("model=%s r%s batches: %s", self.model.name, self.model.release,
                             self.calibration.summary())
            self._reason = reason
        except Exception as exc:  # never leave the event unset
            self._reason = f"the probe failed: {exc}"
        self._log_unbatched()
        self._probed.set()

    def _log_unbatched(self) -> None:
        if self._reason and self.policy.max_batch_size > 1:
            log.info("model=%s r%s runs unbatched: %s", self.model.name, self.model.release, self._reason)

    @property
    def unbatched_reason(self) -> str | None:
        """Why requests are not merged (None: they are); waits for the probe's answer."""
        self._probed.wait()
        return self._reason

    def status(self, *, wait: bool = True) -> dict[str, object]:
        """Batching as GET /v1/models shows it; waits for the probe's answer (``wait=False``:
        ``"reason": "the probe is running"`` until it has answered)."""
        if not wait and not self._probed.is_set():
            return {"mode": "auto" if self.policy.auto else "on", "enabled": False,
                    "reason": "the probe is running (requests run one by one meanwhile)", "calibration": None}
        reason = self.unbatched_reason
        mode = "off" if self.policy.max_batch_size <= 1 else "auto" if self.policy.auto else "on"
        return {"mode": mode, "enabled": reason is None, "reason": reason,
                "calibration": self.calibration.summary() if self.calibration else None}

    @unbatched_reason.setter
    def unbatched_reason(self, reason: str | None) -> None:
        self._reason = reason

    @property
    def max_rows(self) -> int:
        """Rows a merged run may hold; waits for the probe's answer."""
        self._probed.wait()
        return self._rows_cap()

    def _rows_cap(self) -> int:
        """``max_rows`` as of now, without waiting: 1 while the probe has not answered."""
        if self._reason or not self._probed.is_set():
            return 1
        return self.policy.max_batch_size

    # -- callers ---------------------------------------------------------------------

    def _key(self, feeds: Mapping[str, np.ndarray]) -> tuple[tuple[object, ...] | None, int]:
        rows = {arr.shape[0] if arr.ndim else -1 for arr in feeds.values()}
        if self._reason or len(rows) != 1:
            return None, 0
        n = rows.pop()
        key = tuple((k, feeds[k].shape[1:], feeds[k].dtype.str) for k in sorted(feeds))
        return key, n

    def run(self, feeds: dict[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue ``feeds`` (already validated) and wait for the outputs.

        InferenceError: the model failed on this request. RequestTimeout: no result in time.
        """
        # Only a batchable model that may wait for companions needs the key to decide.
        waits = self.policy.max_queue_delay_s > 0 and self._rows_cap() > 1
        key, rows = self._key(feeds) if waits else (None, 0)
        with self._lock:
            # A closed scheduler (its model was swapped out) still serves a caller that took
            # the old model before the swap: nothing is dropped.
            if not self._queue and self._running < self.policy.workers and key is None:
                self._running += 1
                inline = True
            else:
                inline = False
                if not waits:
                    key, rows = self._key(feeds)
                req = _Request(feeds, key, rows)
                done = req.done = threading.Event()
                self._queue.append(req)
                self._hand_off()
        if inline:
            return self._run_inline(feeds, timeout_s)
        if not done.wait(timeout_s):
            with self._cond:
                if req.state == "queued":
                    self._queue.remove(req)
                    req.state = "cancelled"
            if req.state == "cancelled":
                raise RequestTimeout(f"no worker took the request within {timeout_s:g} s", started=False)
            if not done.is_set():
                raise RequestTimeout(f"the run did not finish within {timeout_s:g} s", started=True)
        if req.error is not None:
            raise req.error
        assert req.outputs is not None
        return req.outputs

    def _hand_off(self) -> None:
        """Make sure a worker will take what is queued (lock held)."""
        if len(self._queue) > self._idle and self._alive < self.policy.workers:
            self._alive += 1
            threading.Thread(target=self._work, name=f"infer-{self.model.name}", daemon=True).start()
        else:
            self._cond.notify()

    def _run_inline(self, feeds: dict[str, np.ndarray], timeout_s: float | None) -> dict[str, np.ndarray]:
        """Run in the caller's thread, a run slot already taken: no request object, no event."""
        m = self.model
        t0 = time.perf_counter()
        try:
            outputs = m.session.run(feeds)
        except Exception as exc:
            m.metrics.record(time.perf_counter() - t0, error=True)
            raise InferenceError(f"{m.name} r{m.release} failed: {exc}") from None
        finally:
            with self._lock:
                self._running -= 1
                if self._queue:  # what queued up meanwhile: a worker takes it (merged)
                    self._hand_off()
        latency = time.perf_counter() - t0
        m.metrics.record(latency)
        if self.live is not None and self._rows_cap() > 1:
            first = next(iter(feeds.values()))
            self.live.note(latency, first.shape[0] if first.ndim else 1, merged=False)
        if timeout_s is not None and latency > timeout_s:
            raise RequestTimeout(f"the run did not finish within {timeout_s:g} s", started=True)
        return outputs

    def close(self) -> None:
        """Finish what is queued, then let the workers exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- workers ---------------------------------------------------------------------

    def _take(self) -> list[_Request]:
        """Pop the first request and the compatible ones behind it (lock held)."""
        head = self._queue.popleft()
        batch = [head]
        if head.key is not None and self._rows_cap() > 1:
            self._gather(batch)
        for r in batch:
            r.state = "running"
        return batch

    def _gather(self, batch: list[_Request]) -> None:
        head = batch[0]
        rows, cap = sum(r.rows for r in batch), self._rows_cap()
        for r in list(self._queue):
            if rows >= cap:
                break
            if r.key == head.key and rows + r.rows <= cap:
                self._queue.remove(r)
                batch.append(r)
                rows += r.rows

    def _work(self) -> None:
        while True:
            with self._cond:
                # Wait for a request and for a free run slot (an inline run holds one).
                while not self._queue or self._running >= self.policy.workers:
                    if self._closed and not self._queue:
                        self._alive -= 1
                        return
                    self._idle += 1
                    woke = self._cond.wait(self.idle_exit_s)
                    self._idle -= 1
                    if not woke and not self._queue:
                        self._alive -= 1
                        return
                self._running += 1
                batch = self._take()
                delay = self.policy.max_queue_delay_s
                if delay > 0 and batch[0].key is not None and self._rows_cap() > 1:
                    deadline = batch[0].enqueued + delay
                    while sum(r.rows for r in batch) < self._rows_cap():
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                        before = len(batch)
                        self._gather(batch)
                        for r in batch[before:]:
                            r.state = "running"
            try:
                self._run(batch)
            except Exception:  # a bug here must not leave callers waiting forever
                log.exception("model=%s scheduler failed", self.model.name)
                for r in batch:
                    if r.state != "done":
                        r.error = InferenceError(f"{self.model.name}: internal scheduler error")
                        r.state = "done"
                        if r.done is not None:
                            r.done.set()
            finally:
                with self._cond:
                    self._running -= 1
                    if self._queue and self._idle:
                        self._cond.notify()  # a worker waiting for this slot

    def _finish(self, req: _Request, outputs: dict[str, np.ndarray] | None, exc: Exception | None) -> None:
        m = self.model
        latency = time.perf_counter() - req.enqueued
        if exc is not None:
            req.error = InferenceError(f"{m.name} r{m.release} failed: {exc}")
            m.metrics.record(latency, error=True)
        else:
            req.outputs = outputs
            m.metrics.record(latency)
        req.state = "done"
        if req.done is not None:
            req.done.set()

    def _run_one(self, req: _Request) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.model.session.run(req.feeds)
            if self.live is not None and req.rows and self._rows_cap() > 1:
                self.live.note(time.perf_counter() - t0, req.rows, merged=False)
        except Exception as exc:
            self._finish(req, None, exc)
            return
        self._finish(req, outputs, None)

    def _run(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            self._run_one(batch[0])
            return
        names = list(batch[0].feeds)
        merged = {k: np.concatenate([r.feeds[k] for r in batch]) for k in names}
        total = sum(r.rows for r in batch)
        t0 = time.perf_counter()
        try:
            outputs = self.model.session.run(merged)
        except Exception as exc:
            log.debug("model=%s merged run of %d requests failed (%s); running them one by one",
                      self.model.name, len(batch), exc)
            self.split_retries += 1
            for r in batch:
                self._run_one(r)
            return
        bad = [k for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
        if bad:
            self.unbatched_reason = f"output {bad[0]!r} did not keep the row count of a merged run"
            log.warning("model=%s r%s: %s; batching off for it", self.model.name, self.model.release,
                        self.unbatched_reason)
            for r in batch:
                self._run_one(r)
            return
        self.batches += 1
        if self.live is not None:
            self.live.note(time.perf_counter() - t0, total, merged=True)
            reason = self.live.verdict()
            if reason is not None and self._reason is None:
                self.unbatched_reason = reason
                log.warning("model=%s r%s: %s; batching off for it", self.model.name,
                            self.model.release, reason)
        start = 0
        for r in batch:
            self._finish(r, {k: v[start : start + r.rows] for k, v in outputs.items()}, None)
            start += r.rows
