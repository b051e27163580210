"""The installer: where an update starts and ends. Its entry points run the update machine
(agent.update.machine) through the effects runner (agent.update.runner):

- ``apply_target``: the fleet desires a release (skipped when failed here before, or while a
  retryable failure waits its pause, which doubles with each consecutive failure);
- ``install_file``: an operator installs a bundle file (offline: committed at once);
- ``stage_shadow``: a shadow candidate, a second record run up to TRIAL beside the active one;
- ``recover`` after a start (finish the floor write, count a restart on trial, load the
  active release, else the previous) and ``resume`` of an update a restart interrupted
  (``machine.WORK_OF_STATE``: every step is idempotent);
- ``check_trials`` (commit or roll back trials whose time is up) and ``resume_staged``
  (activate staged releases once their window opens and no update lock is held).

docs/agent-lifecycle.md holds the diagram, what each state persists and the crash matrix.

Events go to ``emit(model, kind, release, from_release, reason, message)``: for
``activated`` release is the new one and from_release the one it replaced; for
``rolled_back`` release is the one serving again and from_release the one that failed;
otherwise release is the target and from_release the active release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from agent import __version__
from agent.errors import (
    DownloadError,
    StateError,
)
from agent.runtime.base import Backend
from agent.runtime.host import LoadedModel, ModelHost
from agent.update import lifecycle as lc
from agent.update import machine as m
from agent.update.blobs import BlobStore
from agent.update.fetch import Cancelled, Fetcher, WaitingForWindow
from agent.update.gating import ActivationGate, TrialFigures, TrialLimits, judge_trial
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target
from agent.update.runner import EffectRunner, EventSink, _Drive, _reason
from agent.update.store import StateStore
from shared.bundle.trust import TrustRoot
from shared.errors import EdgefleetError
from shared.telemetry.vocabulary import RETRYABLE_REASONS, UpdateState

log = logging.getLogger(__name__)

S = UpdateState
# Failures worth retrying with the same digest (the bundle itself is not at fault).
RETRYABLE = RETRYABLE_REASONS

MIB = 1 << 20

# The bundle sources (agent.update.sources: tarfile, chunked downloads) are imported by the
# operations that drive a bundle, not with the installer: a start that only loads the
# active releases never needs them (agent cold start, docs/performance.md).


class Installer(EffectRunner):
    def __init__(
        self,
        *,
        store: StateStore,
        blobs: BlobStore,
        host: ModelHost,
        trust_root: TrustRoot,
        backend: Backend,
        trial_seconds: float = 10.0,
        trial_max_error_rate: float = 0.5,
        trial_min_inferences: int = 0,
        fetcher: Fetcher | None = None,
        emit: EventSink | None = None,
        agent_version: str = __version__,
        clock: Callable[[], float] = time.time,
        trial_max_restarts: int = 0,
        disk_margin_bytes: int = 16 * MIB,
        retry_failed_s: float = 30.0,
        retry_failed_max_s: float = 1800.0,
        gate: ActivationGate | None = None,
        expiry_now: Callable[[], datetime] | None = None,
        offline_expiry_grace_s: float = 0.0,
        trial_max_latency_ratio: float | None = 2.0,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.host = host
        self.trust = trust_root
        self.backend = backend
        self.trial_seconds = trial_seconds
        self.trial_max_error_rate = trial_max_error_rate
        self.trial_min_inferences = trial_min_inferences
        self.trial_max_latency_ratio = trial_max_latency_ratio
        # latencies of the release a trial replaced, per model (judge_trial: trial_latency)
        self._replaced_latencies: dict[str, list[float]] = {}
        self.fetcher = fetcher
        self._emit = emit
        self.agent_version = agent_version
        self.clock = clock
        self.trial_max_restarts = trial_max_restarts
        self.disk_margin_bytes = disk_margin_bytes
        self.retry_failed_s = retry_failed_s
        self.retry_failed_max_s = retry_failed_max_s
        # Activation windows and update locks (agent.update.gating); None: activate at once.
        self.gate = gate
        # The time expiry is checked against (agent.update.clock: the best time the agent has).
        self.expiry_now = expiry_now or (lambda: datetime.now(UTC))
        self.offline_expiry_grace_s = offline_expiry_grace_s
        self._lock = threading.RLock()
        # Candidates staged for shadow evaluation (agent.update.shadow_stage), by model: the
        # garbage collection keeps their files like those of a record.
        self.shadow_refs: dict[str, Target] = {}

    # -- public operations ----------------------------------------------------------

    def records(self) -> dict[str, ModelRecord]:
        return self.store.load_all()

    def recover(self) -> list[str]:
        """Load each model's active release after a start; return models with an update to resume."""
        pending = []
        with self._lock:
            for name, rec in self.store.load_all().items():
                if rec.active is not None:
                    # Activation writes the record, then anti-rollback: finish the second write.
                    self.store.raise_highest(name, rec.active.release, rec.active.digest)
                try:
                    if rec.state == S.TRIAL and rec.active is not None:
                        # The restart is counted and persisted BEFORE the release is loaded
                        # again: one that crashes the process cannot loop forever.
                        self._run(rec, m.Restarted(self.trial_max_restarts, self.trial_seconds))
                        continue
                except (EdgefleetError, StateError) as exc:
                    log.error("model=%s recovery from trial failed: %s", name, exc)
                    rec = self.store.load(name) or rec
                self._load_active(rec)
                if rec.state in lc.IN_PROGRESS:
                    pending.append(name)
        return pending

    def _load_active(self, rec: ModelRecord) -> None:
        """Never serve none: load active, else previous."""
        for ref in (rec.active, rec.previous):
            if ref is None:
                continue
            try:
                self.host.swap(self.load_release(rec.name, ref))
            except (EdgefleetError, StateError) as exc:
                log.error("model=%s cannot load r%s: %s", rec.name, ref.release, exc)
                continue
            if ref is rec.previous:
                log.warning("model=%s serving previous r%s: the active one failed to load",
                            rec.name, ref.release)
                self._run(rec, m.ActiveUnloadable())
            return
        if rec.active is not None:
            log.error("model=%s: no release of it can be loaded", rec.name)

    def resume(self, name: str) -> ModelRecord | None:
        """Continue an update a restart interrupted (steps are idempotent)."""
        from agent.update.sources import FileSource, FleetSource

        with self._lock:
            rec = self.store.load(name)
            if rec is None or rec.state not in lc.IN_PROGRESS or rec.target is None:
                return rec
            try:
                if rec.target.bundle_path:
                    return self._drive(rec, None, _Drive(FileSource(Path(rec.target.bundle_path)),
                                                         trial=False))
                if self.fetcher is None:
                    raise DownloadError("no fleet connection to resume the download")
                if (waiting := self._waiting(rec, rec.target)) is not None:
                    return waiting
                return self._drive(rec, None, _Drive(FleetSource(self.fetcher, rec.target)))
            except WaitingForWindow:
                return self._waiting(self.store.load(name) or rec, rec.target) or rec
            except Cancelled:
                return self.store.load(name)
            except EdgefleetError as exc:
                log.warning("model=%s resume failed: %s: %s", name, _reason(exc), exc)
                return self.store.load(name)

    def install_file(self, path: Path, *, trial: bool = False) -> ModelRecord:
        """Install a single-file bundle; raise the refusal (EdgefleetError with its code).

        The signatures are verified once, here (the model's name comes from the manifest);
        FETCH then checks name, digest and release policy on that verified manifest.
        """
        from agent.update.sources import FileSource

        source = FileSource(path)
        with self._lock:
            vm = self.verify_signed(source.envelope(), offline=True)
            name = vm.manifest.name
            rec = self.store.load(name) or ModelRecord(name=name)
            target = Target(vm.manifest.release, vm.digest, bundle_path=str(Path(path).resolve()))
            rec = self._drive(rec, m.NewTarget(target), _Drive(source, trial=trial, verified=vm))
            self.gc()
            return rec

    def stage_shadow(self, rec: ModelRecord, target: Target, *,
                     serve: Callable[[LoadedModel], None], note: str) -> ModelRecord:
        """Run a shadow candidate's own record (active: the serving release) through the
        machine up to TRIAL, where ``serve`` runs it beside the serving release; raise the
        refusal (recorded as the candidate's ``failed`` event) like ``install_file``."""
        if self.fetcher is None:
            raise DownloadError("no fleet connection to fetch the shadow candidate")
        from agent.update.sources import FleetSource

        with self._lock:
            ctx = _Drive(FleetSource(self.fetcher, target), shadow=serve, shadow_note=note)
            return self._drive(rec, m.NewTarget(target), ctx)

    def _waiting(self, rec: ModelRecord, target: Target) -> ModelRecord | None:
        """On a metered link outside its window: note why in the record's message (shown by
        ``edgefleet-agent status``) without changing its state, and return it; else None.

        The record keeps its state (a download cut by the window's end stays DOWNLOADING with
        its partial); the message is written only when it changes, not at every poll.
        """
        reason = self.fetcher.waiting_reason() if self.fetcher is not None else None
        if reason is None:
            return None
        message = f"r{target.release} {reason}"
        if rec.message != message:
            log.info("model=%s: %s", rec.name, message)
        return self._run(rec, m.Waiting(message))

    def apply_target(self, name: str, target: Target) -> ModelRecord:
        """Make ``target`` (desired by the fleet) the model's release. Failures are recorded."""
        from agent.update.sources import FleetSource

        with self._lock:
            rec = self.store.load(name) or ModelRecord(name=name)
            if rec.active is not None and rec.active.digest == target.digest:
                return rec
            if rec.target is not None and rec.target.digest == target.digest and rec.state in lc.IN_PROGRESS:
                rec = self._run(rec, m.WindowChanged(target.activation_window))
                return self.resume(name) or rec
            if target.digest in rec.failed_digests:
                log.debug("model=%s r%s failed here before; waiting for another release",
                          name, target.release)
                return rec
            same = rec.target is not None and rec.target.digest == target.digest
            if same and rec.state == S.FAILED and self.clock() < rec.updated + self.retry_pause(rec):
                return rec
            if self.fetcher is None:
                raise RuntimeError("apply_target needs a fetcher")
            if (waiting := self._waiting(rec, target)) is not None:
                return waiting
            try:
                return self._drive(rec, m.NewTarget(target), _Drive(FleetSource(self.fetcher, target)))
            except WaitingForWindow:
                return self._waiting(self.store.load(name) or rec, target) or rec
            except Cancelled:
                return self.store.load(name) or rec
            except EdgefleetError as exc:
                log.warning("model=%s r%s refused: %s: %s", name, target.release, _reason(exc), exc)
                return self.store.load(name) or rec

    def check_trials(self) -> float | None:
        """Commit or roll back trials whose time is up; return seconds to the next deadline."""
        now = self.clock()
        next_in: float | None = None
        with self._lock:
            for rec in self.store.load_all().values():
                if rec.state != S.TRIAL or rec.active is None:
                    continue
                until = rec.trial_until or now
                if until > now:
                    next_in = until - now if next_in is None else min(next_in, until - now)
                    continue
                self._judge_trial(rec)
        return next_in

    def _judge_trial(self, rec: ModelRecord) -> ModelRecord:
        assert rec.active is not None
        loaded = self.host.get(rec.name)
        previous = self._replaced_latencies.pop(rec.name, [])
        figures = TrialFigures(0, 0, previous_latencies=previous)
        if loaded is not None and loaded.digest == rec.active.digest:
            total, errors = loaded.metrics.totals()
            figures = TrialFigures(total, errors, loaded.metrics.recent_latencies(), previous)
        judged = judge_trial(figures, TrialLimits(self.trial_max_error_rate, self.trial_min_inferences,
                                                  self.trial_max_latency_ratio))
        if judged.reason is not None:
            rec = self._run(rec, m.TrialFailed(judged.reason, judged.message))
        else:
            rec = self._run(rec, m.TrialHealthy(judged.message))
        self.gc()
        return rec

    def gc(self) -> None:
        """Remove blobs and envelopes no record references (active, previous, target)."""
        keep_blobs: set[str] = set()
        keep_env: set[Path] = set()
        try:
            records = self.store.load_all()
        except StateError as exc:
            log.error("gc skipped: %s", exc)
            return
        shadows = list(self.shadow_refs.items())
        held = ((r.name, (r.active, r.previous, r.committed, r.target)) for r in records.values())
        for name, refs in [*held,
                           *((n, (t,)) for n, t in shadows)]:
            for ref in refs:
                if ref is None:
                    continue
                keep_env.add(self.blobs.envelope_path(name, ref.release, ref.digest))
                try:
                    manifest = self._stored_manifest(name, ref)
                except (StateError, EdgefleetError):
                    continue
                keep_blobs.update(f.sha256 for f in manifest.files.values())
        removed = self.blobs.gc(keep_blobs, keep_env)
        if removed:
            log.info("gc removed %d blob(s)", len(removed))

    # -- activation windows and update locks ----------------------------------------------

    def resume_staged(self) -> float | None:
        """Activate the staged releases now allowed; return seconds to the next moment one may be."""
        if self.gate is None:
            return None
        try:
            records = self.store.load_all()
        except StateError as exc:
            log.error("staged releases not checked: %s", exc)
            return None
        next_in: float | None = None
        for name, rec in records.items():
            if rec.state != S.STAGED or rec.target is None or rec.target.bundle_path:
                continue
            if self.gate.waiting_for(rec.target.activation_window) is None:
                self.resume(name)
                continue
            with self._lock:
                current = self.store.load(name)
                if current is not None and current.state == S.STAGED:
                    message = self._activation_wait_message(current)
                    if message is not None:
                        self._run(current, m.Waiting(message))
            wake = self.gate.wake_in(rec.target.activation_window)
            if wake is not None:
                next_in = wake if next_in is None else min(next_in, wake)
        return next_in


    def held_releases(self) -> dict[str, list[int]]:
        """Per model, the releases whose envelope and files are kept on the device (active,
        previous, last committed, and a staged target): a fleet rollback to one downloads nothing."""
        try:
            records = self.store.load_all()
        except StateError:
            return {}
        out: dict[str, list[int]] = {}
        for name, rec in records.items():
            refs: list[ReleaseRef | Target | None] = [rec.active, rec.previous, rec.committed]
            if rec.state in (S.STAGED, S.SMOKE_TESTING):
                refs.append(rec.target)
            out[name] = sorted({r.release for r in refs if r is not None})
        return out

    def waiting(self) -> dict[str, str]:
        """Per model, what a pending update waits for (window, lock, metered link), if anything."""
        try:
            records = self.store.load_all()
        except StateError:
            return {}
        return {name: rec.message for name, rec in records.items()
                if " waiting for " in f" {rec.message}"
                and rec.state not in (S.FAILED, S.ROLLED_BACK, S.TRIAL)}
