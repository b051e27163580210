"""The model host: one active LoadedModel per model name, hot-swapped under a lock.

Several models may be active at once, each on its own backend (onnxruntime, LiteRT).
A request takes the reference to the active LoadedModel (and its scheduler) once and
runs on it to the end; a swap replaces the reference, so in-flight and queued requests
finish on the old session and new ones use the new session. Nothing is dropped.
Requests run through the model's scheduler (agent.runtime.batching), which merges
concurrent requests into one run when the model allows it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from agent.errors import InputError, UnknownModelError
from agent.runtime.base import Session
from agent.runtime.batch_gain import Calibration, Run, measure_gain
from agent.runtime.batching import BatchPolicy, ModelScheduler
from agent.runtime.metrics import Metrics
from agent.runtime.shadow import ShadowRunner
from shared.bundle.manifest import Manifest

if TYPE_CHECKING:  # the message Structs are not imported with the agent
    from shared.telemetry.messages import ShadowHealth

log = logging.getLogger(__name__)


class LoadedModel(msgspec.Struct, frozen=True):
    manifest: Manifest
    release: int
    digest: str
    session: Session
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    loaded_at: float = msgspec.field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.manifest.name


def validate_inputs(manifest: Manifest, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, dtype, rank and fixed dimensions against the signature; raise InputError."""
    want = {s.name for s in manifest.inputs}
    if set(inputs) != want:
        missing, extra = sorted(want - set(inputs)), sorted(set(inputs) - want)
        raise InputError(
            f"model {manifest.name} takes inputs {sorted(want)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    out: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        arr = inputs[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input {spec.name!r} is not an array")
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r} has dtype {arr.dtype}, the model takes {spec.dtype}")
        if arr.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r} has {arr.ndim} dimension(s) {list(arr.shape)}, "
                f"the model takes {len(spec.shape)}: {spec.shape}"
            )
        for axis, (got, dim) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if isinstance(dim, int) and got != dim:
                raise InputError(
                    f"input {spec.name!r} axis {axis} has size {got}, the model takes {dim} "
                    f"(shape {spec.shape})"
                )
        out[spec.name] = arr
    for name, value in (manifest.fixed_inputs or {}).items():
        if out[name] != value:
            raise InputError(
                f"input {name!r} is {out[name].item()!r}; release {manifest.release} of "
                f"{manifest.name} was built for {name} = {value!r} only (--fix-input)"
            )
    return out


class InputCheck:
    """``validate_inputs`` compiled once per release: what the signature proves about a
    request (names, dtypes, ranks, fixed sizes) checked in a few comparisons, and the
    caller's own dict passed on as the feeds (no copy). Anything unusual (a missing name, a
    wrong dtype, a fixed input) goes to ``validate_inputs``, which says what is wrong."""

    __slots__ = ("_fixed", "_manifest", "_names", "_specs")

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._names = frozenset(s.name for s in manifest.inputs)
        self._specs = tuple(
            (s.name, np.dtype(s.dtype), len(s.shape),
             tuple((axis, dim) for axis, dim in enumerate(s.shape) if isinstance(dim, int)))
            for s in manifest.inputs)
        self._fixed = bool(manifest.fixed_inputs)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if self._fixed or len(inputs) != len(self._specs) or type(inputs) is not dict:
            return validate_inputs(self._manifest, inputs)
        ndarray = np.ndarray
        for name, dtype, ndim, fixed in self._specs:
            arr = inputs.get(name)
            if type(arr) is not ndarray or arr.dtype != dtype or arr.ndim != ndim:
                return validate_inputs(self._manifest, inputs)
            shape = arr.shape
            for axis, dim in fixed:
                if shape[axis] != dim:
                    return validate_inputs(self._manifest, inputs)
        return inputs


class ModelHost:
    def __init__(self, policy: BatchPolicy | None = None, *,
                 on_load: Callable[[LoadedModel], None] | None = None,
                 measure: Callable[[Run, dict[str, np.ndarray], int], Calibration] | None = None) -> None:
        self.policy = policy or BatchPolicy()
        # how the schedulers time a model for the batching decision (agent.runtime.batch_gain)
        self.measure = measure or measure_gain
        # Called with each release before it becomes active (agent.telemetry.drift attaches
        # the baseline there); a failing hook is logged, never blocks the swap.
        self.on_load = on_load
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._schedulers: dict[str, ModelScheduler] = {}
        # name -> what a predict needs, replaced whole by a swap: read without the lock (one
        # dict look-up is atomic), so a request sees the old release or the new one, never a mix
        self._active: dict[str, tuple[LoadedModel, ModelScheduler, InputCheck]] = {}
        # candidate releases evaluated in shadow beside the active one (agent.runtime.shadow)
        self._shadows: dict[str, ShadowRunner] = {}

    def get(self, name: str) -> LoadedModel | None:
        with self._lock:
            return self._models.get(name)

    def scheduler(self, name: str) -> ModelScheduler | None:
        with self._lock:
            return self._schedulers.get(name)

    def snapshot(self) -> dict[str, LoadedModel]:
        with self._lock:
            return dict(self._models)

    def swap(self, loaded: LoadedModel) -> LoadedModel | None:
        """Make ``loaded`` the active release of its model; return the one it replaced."""
        if self.on_load is not None:
            try:
                self.on_load(loaded)
            except Exception:
                log.exception("on_load hook failed for %s r%s", loaded.name, loaded.release)
        # its batching probe (and calibration) runs in the background
        scheduler = ModelScheduler(loaded, self.policy, measure=self.measure)
        with self._lock:
            old = self._models.get(loaded.name)
            old_scheduler = self._schedulers.get(loaded.name)
            self._models[loaded.name] = loaded
            self._schedulers[loaded.name] = scheduler
            self._active[loaded.name] = (loaded, scheduler, InputCheck(loaded.manifest))
        if old_scheduler is not None:
            old_scheduler.close()
        return old

    def remove(self, name: str) -> LoadedModel | None:
        with self._lock:
            old_scheduler = self._schedulers.pop(name, None)
            old = self._models.pop(name, None)
            self._active.pop(name, None)
        if old_scheduler is not None:
            old_scheduler.close()
        return old

    def close(self) -> None:
        """Let every scheduler finish its queue and its workers exit."""
        with self._lock:
            schedulers = list(self._schedulers.values())
            shadows = list(self._shadows.values())
            self._shadows.clear()
        for scheduler in schedulers:
            scheduler.close()
        for runner in shadows:
            runner.close()

    # -- shadow evaluation ---------------------------------------------------------------

    def set_shadow(self, name: str, runner: ShadowRunner) -> None:
        """Run ``runner``'s candidate beside the active release of ``name`` (replacing any)."""
        with self._lock:
            old = self._shadows.get(name)
            self._shadows[name] = runner
        if old is not None and old is not runner:
            old.close()

    def clear_shadow(self, name: str) -> ShadowRunner | None:
        with self._lock:
            old = self._shadows.pop(name, None)
        if old is not None:
            old.close()
        return old

    def shadow(self, name: str) -> ShadowRunner | None:
        with self._lock:
            return self._shadows.get(name)

    def shadow_health(self, name: str) -> ShadowHealth | None:
        """The shadow figures of ``name`` for its health report; None without a shadow."""
        runner = self.shadow(name)
        return runner.health() if runner is not None else None

    def ready(self) -> bool:
        with self._lock:
            return bool(self._models)

    def predict(
        self, name: str, inputs: Mapping[str, np.ndarray], *, timeout_s: float | None = None
    ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        """Run the active release of ``name``.

        InputError: bad request; InferenceError: runtime; RequestTimeout: no result within
        ``timeout_s`` (None waits as long as it takes).
        """
        active = self._active.get(name)
        if active is None:
            raise UnknownModelError(f"no active model named {name!r}")
        model, scheduler, check = active
        feeds = check(inputs)
        if model.metrics.drift is not None:
            model.metrics.observe(feeds)  # drift: a subsample of the inputs
        shadow = self._shadows.get(name)
        if shadow is None:
            return model, scheduler.run(feeds, timeout_s)
        t0 = time.perf_counter()
        outputs = scheduler.run(feeds, timeout_s)
        # A sample of requests also goes to the candidate: a queue put, never a wait.
        shadow.offer(feeds, outputs, time.perf_counter() - t0)
        return model, outputs
