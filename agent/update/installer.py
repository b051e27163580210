"""The installer: the runner of the update machine (agent.update.machine), with real I/O.

The machine decides (``step(record, event) -> (record, effects)``); this module performs
the effects in order: persist a record (agent.update.store), emit a telemetry event, swap
the serving session, raise the anti-rollback floor, pause at a test checkpoint, and do the
I/O work of a state, which ends with the next event:

    FETCH             fetch the envelope (or read it from a bundle file), verify signatures,
                      scope, expiry, agent version and anti-rollback BEFORE any model byte;
                      store it                                          -> EnvelopeVerified
    FETCH_BLOBS       check free space for the missing blobs; fetch (resuming kept
                      partials) or extract each blob the store lacks    -> BlobsPlaced
    RECHECK           re-verify the stored envelope, re-hash every blob -> Rechecked | Damaged
    AWAIT_ACTIVATION  the activation window and update locks (fleet releases only)
                                                                        -> ActivationAllowed | Waiting
    SMOKE             load in a NEW session (old one keeps serving), golden vectors
                                                                        -> SmokePassed
    RELOAD_TRIAL      load the release on trial again after a restart   -> nothing | TrialFailed
    LOAD_PREVIOUS     load the previous release to roll back to         -> PreviousLoaded | PreviousUnloadable

A failure of the work (a named EdgefleetError, an I/O error) becomes the machine's
``Failed`` event with its reason code; the active model is untouched. Retryable reasons
(download, disk_full) are retried after a pause that doubles with each consecutive failure
of the same target. A restart re-enters the persisted state and does its work again
(``machine.WORK_OF_STATE``). docs/agent-lifecycle.md holds the diagram, what each state
persists and the crash matrix.

Events go to ``emit(model, kind, release, from_release, reason, message)``: for
``activated`` release is the new one and from_release the one it replaced; for
``rolled_back`` release is the one serving again and from_release the one that failed;
otherwise release is the target and from_release the active release.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent import __version__
from agent.errors import (
    DiskFullError,
    DownloadError,
    LoadError,
    StateError,
)
from agent.runtime.base import Backend
from agent.runtime.host import LoadedModel, ModelHost
from agent.update import lifecycle as lc
from agent.update import machine as m
from agent.update.blobs import BlobStore, disk_full
from agent.update.fetch import Cancelled, Fetcher, WaitingForWindow
from agent.update.gating import ActivationGate, TrialFigures, TrialLimits, judge_trial
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target, UpdateState
from agent.update.smoke import run_golden
from agent.update.sources import BundleSource, FileSource, FleetSource
from agent.update.store import StateStore
from agent.update.testhooks import pause_point
from shared.bundle.envelope import Envelope
from shared.bundle.manifest import FileRef, Manifest, parse_manifest, payload_digest
from shared.bundle.trust import TrustRoot, VerifiedManifest, check_release_policy
from shared.errors import EdgefleetError, ExpiredError, HashMismatchError, MalformedDocumentError
from shared.telemetry.vocabulary import RETRYABLE_REASONS, EventKind, ReasonCode

log = logging.getLogger(__name__)

EventSink = Callable[[str, str, int, int | None, str | None, str], None]
S = UpdateState
# Failures worth retrying with the same digest (the bundle itself is not at fault).
RETRYABLE = RETRYABLE_REASONS
MAX_FAILED_DIGESTS = m.MAX_FAILED_DIGESTS
MIB = 1 << 20


def _reason(exc: EdgefleetError) -> ReasonCode:
    try:
        return ReasonCode(exc.code)
    except ValueError:
        return ReasonCode.MALFORMED


@dataclass
class _Drive:
    """What one run of the machine needs besides the record: where the bundle comes from,
    whether it activates on trial (fleet) or commits at once (offline), and what the work
    of one step hands to the next (the verified envelope, the sessions loaded to swap in)."""

    source: BundleSource | None = None
    trial: bool = True
    verified: VerifiedManifest | None = None
    redownloads: int = 0
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    record: ModelRecord | None = None
    # A shadow candidate's record (agent.update.shadow_stage): kept in memory, never gated,
    # never swapped in nor raising the floor; ``shadow`` serves the loaded candidate beside
    # the active release, and only the events the fleet counts for a shadow are published.
    shadow: Callable[[LoadedModel], None] | None = None
    shadow_note: str = ""


class Installer:
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

    # -- telemetry events (decided by the machine) and retries ------------------------

    def emit(
        self, model: str, kind: str, release: int, from_release: int | None,
        reason: str | None = None, message: str = "",
    ) -> None:
        log.info(
            "model=%s event=%s release=%s from=%s reason=%s %s",
            model, kind, release, from_release, reason, message,
        )
        if self._emit is not None:
            try:
                self._emit(model, kind, release, from_release, reason, message)
            except Exception:
                log.exception("event sink failed")

    def retry_pause(self, rec: ModelRecord) -> float:
        """Seconds a retryable failure waits before the same target is tried again."""
        if rec.attempts <= 0:
            return 0.0
        return float(min(self.retry_failed_max_s, self.retry_failed_s * 2 ** min(rec.attempts - 1, 30)))

    # -- verification and loading -------------------------------------------------

    def verify_signed(self, envelope: bytes, *, offline: bool = False) -> VerifiedManifest:
        """Signatures, scope and expiry against the best time the agent has.

        For a bundle file (``offline``) whose only fault is an expiry within
        ``offline_expiry_grace_s`` of that time, accept it and log that the grace was used.
        Signatures are verified either way; anti-rollback is checked after, unchanged.
        """
        now = self.expiry_now()
        try:
            return self.trust.verify_manifest(envelope, now=now)
        except ExpiredError as exc:
            grace = self.offline_expiry_grace_s
            if not offline or grace <= 0:
                raise
            try:
                vm = self.trust.verify_manifest(envelope, now=now - timedelta(seconds=grace))
            except ExpiredError as again:
                raise ExpiredError(f"{again}; older than the offline grace of {grace:g} s "
                                   "(update.offline_expiry_grace_s)", **again.details) from None
            log.warning("model=%s r%s: OFFLINE EXPIRY GRACE used: %s (best time %s); accepted "
                        "because update.offline_expiry_grace_s = %g s", vm.manifest.name,
                        vm.manifest.release, exc, now.isoformat(timespec="seconds"), grace)
            return vm


    def _verify(self, name: str | None, target_digest: str | None, envelope: bytes, *,
                offline: bool = False) -> VerifiedManifest:
        return self._check_verified(name, target_digest, self.verify_signed(envelope, offline=offline))

    def _check_verified(self, name: str | None, target_digest: str | None,
                        vm: VerifiedManifest) -> VerifiedManifest:
        """The checks after the signatures: model name, desired digest, release policy."""
        if name is not None and vm.manifest.name != name:
            raise MalformedDocumentError(
                f"the envelope is for model {vm.manifest.name!r}, expected {name!r}"
            )
        if target_digest is not None and vm.digest != target_digest:
            raise HashMismatchError(
                f"the envelope's digest {vm.digest[:12]}… differs from the desired {target_digest[:12]}…"
            )
        check_release_policy(
            vm.manifest, vm.digest, agent_version=self.agent_version,
            highest=self._consistent_highest(vm.manifest.name),
        )
        return vm

    def _consistent_highest(self, name: str) -> tuple[int, str] | None:
        """The anti-rollback floor, refusing (fail closed) when it is below what the device holds.

        Activation writes the record, then raises the floor; ``recover`` closes that crash
        window at startup, before anything is verified. A floor below the active or previous
        release found later means the file was rolled back or damaged under a running agent.
        """
        highest = self.store.highest(name)
        rec = self.store.load(name)
        held = [r for r in (rec.active, rec.previous) if r is not None] if rec else []
        top = max((r.release for r in held), default=None)
        if top is not None and (highest is None or highest[0] < top):
            raise StateError(
                f"anti-rollback state for {name} says r{highest[0] if highest else 'none'} but this "
                f"device holds r{top}: the state file was rolled back or damaged; refusing every "
                "bundle for this model until an operator repairs it (restore antirollback.json)"
            )
        return highest

    def _stored_manifest(self, name: str, ref: ReleaseRef | Target) -> Manifest:
        """The manifest of a release verified earlier, from its stored envelope."""
        data = self.blobs.load_envelope(name, ref.release, ref.digest)
        if data is None:
            raise StateError(f"{name} r{ref.release}: its envelope is missing from state_dir")
        env = Envelope.from_json(data)
        if payload_digest(env.payload) != ref.digest:
            raise StateError(f"{name} r{ref.release}: the stored envelope does not match its digest")
        return parse_manifest(env.payload)

    def _load(self, manifest: Manifest, digest: str) -> LoadedModel:
        # The backend refuses a runtime it does not run (LoadError, reason "load").
        model_ref = manifest.files["model"]
        if not self.blobs.has(model_ref):
            raise LoadError(f"{manifest.name} r{manifest.release}: model blob is missing")
        session = self.backend.load(self.blobs.path(model_ref.sha256), manifest)
        return LoadedModel(manifest=manifest, release=manifest.release, digest=digest, session=session)

    def load_release(self, name: str, ref: ReleaseRef) -> LoadedModel:
        return self._load(self._stored_manifest(name, ref), ref.digest)

    def smoke_test(self, loaded: LoadedModel) -> None:
        """Run the golden inputs and compare with the golden outputs; raise SmokeTestError."""
        run_golden(loaded, self.blobs.path(loaded.manifest.files["golden"].sha256))

    # -- the runner: perform the machine's effects ---------------------------------------

    def _run(self, rec: ModelRecord, event: m.Event, ctx: _Drive | None = None) -> ModelRecord:
        """Feed ``event`` to the machine, perform its effects in order, then the events the
        work effects end with, until the machine asks for nothing more."""
        ctx = ctx or _Drive()
        queue: list[m.Event] = [event]
        while queue:
            rec, effects = m.step(rec, queue.pop(0), self.clock())
            ctx.record = rec
            for effect in effects:
                follow = self._perform(rec, effect, ctx)
                if follow is not None:
                    queue.append(follow)
        return rec

    def _perform(self, rec: ModelRecord, effect: m.Effect, ctx: _Drive) -> m.Event | None:
        if ctx.shadow is not None and not isinstance(effect, m.Do):
            self._perform_shadow(rec, effect, ctx)
            return None
        if isinstance(effect, m.Persist):
            self.store.save(effect.record)
        elif isinstance(effect, m.Emit):
            self.emit(rec.name, str(effect.kind), effect.release, effect.from_release,
                      None if effect.reason is None else str(effect.reason), effect.message)
        elif isinstance(effect, m.Checkpoint):
            pause_point(effect.name)
        elif isinstance(effect, m.RaiseFloor):
            self.store.raise_highest(rec.name, effect.release, effect.digest)
        elif isinstance(effect, m.Swap):
            loaded = ctx.loaded.pop(effect.release.digest, None)
            old = self.host.swap(loaded or self.load_release(rec.name, effect.release))
            self._replaced_latencies[rec.name] = old.metrics.recent_latencies() if old is not None else []
        else:
            assert isinstance(effect, m.Do)
            return self._work(rec, effect, ctx)
        return None

    def _perform_shadow(self, rec: ModelRecord, effect: m.Effect, ctx: _Drive) -> None:
        """A shadow candidate's effects: its record stays in memory (ctx.record), it serves
        beside the active release instead of being swapped in, the floor never moves, and of
        its events the fleet sees verified, failed and, once it runs, staged."""
        if isinstance(effect, m.Swap):
            loaded = ctx.loaded.pop(effect.release.digest)
            assert ctx.shadow is not None
            ctx.shadow(loaded)
        elif isinstance(effect, m.Emit):
            message = {
                EventKind.VERIFIED: f"shadow candidate, {effect.message}",
                EventKind.FAILED: f"shadow: {effect.message}",
                EventKind.ACTIVATED: ctx.shadow_note,
            }.get(effect.kind)
            if message is not None:
                kind = EventKind.STAGED if effect.kind == EventKind.ACTIVATED else effect.kind
                self.emit(rec.name, str(kind), effect.release, effect.from_release,
                          None if effect.reason is None else str(effect.reason), message)

    def _work(self, rec: ModelRecord, do: m.Do, ctx: _Drive) -> m.Event | None:
        work = do.work
        if work == m.Work.FETCH:
            return self._fetch_envelope(rec, ctx)
        if work == m.Work.FETCH_BLOBS:
            return self._fetch_blobs(ctx)
        if work == m.Work.RECHECK:
            return self._recheck(rec, ctx)
        if work == m.Work.AWAIT_ACTIVATION:
            return self._await_activation(rec, ctx)
        if work == m.Work.SMOKE:
            return self._smoke(rec, ctx)
        if work == m.Work.RELOAD_TRIAL:
            return self._reload_trial(rec)
        assert work == m.Work.LOAD_PREVIOUS and do.reason is not None
        return self._load_previous(rec, do.reason, do.message, ctx)

    def _drive(self, rec: ModelRecord, event: m.Event | None, ctx: _Drive) -> ModelRecord:
        """Run an update from ``event`` (None: redo the work of the persisted state) until it
        waits, ends or fails; a failure is recorded (FAILED, reason code) and raised."""
        ctx.record = rec
        try:
            if event is None:
                event = self._work(rec, m.Do(m.WORK_OF_STATE[rec.state]), ctx)
            return rec if event is None else self._run(rec, event, ctx)
        except Cancelled:
            log.info("model=%s stopping in %s; the next start resumes it", rec.name, ctx.record.state)
            raise
        except StateError as exc:
            self._record_failure(ctx, MalformedDocumentError(str(exc)))
            raise
        except EdgefleetError as exc:
            self._record_failure(ctx, exc)
            raise
        except OSError as exc:
            err: EdgefleetError = (
                disk_full(exc, "the bundle") if exc.errno == errno.ENOSPC
                else DownloadError(f"I/O error while installing: {exc}")
            )
            self._record_failure(ctx, err)
            raise err from None

    def _record_failure(self, ctx: _Drive, exc: EdgefleetError) -> None:
        rec = ctx.record
        assert rec is not None
        if rec.state in lc.IN_PROGRESS:
            self._run(rec, m.Failed(_reason(exc), str(exc)), ctx)
        else:  # past activation (the record names the new release): nothing to undo
            log.error("model=%s in %s: %s", rec.name, rec.state, exc)

    # -- the work of each state -------------------------------------------------------

    def _fetch_envelope(self, rec: ModelRecord, ctx: _Drive) -> m.Event:
        """FETCH: verify the envelope before any big byte and store it."""
        assert rec.target is not None and ctx.source is not None
        target = rec.target
        offline = isinstance(ctx.source, FileSource)
        if ctx.verified is not None:  # signatures verified by the caller: not a second time
            vm = self._check_verified(rec.name, target.digest, ctx.verified)
        else:
            vm = self._verify(rec.name, target.digest, ctx.source.envelope(), offline=offline)
        ctx.verified = vm
        self.blobs.save_envelope(rec.name, vm.manifest.release, vm.digest, vm.envelope)
        return m.EnvelopeVerified(vm.delegation)

    def _fetch_blobs(self, ctx: _Drive) -> m.Event:
        """FETCH_BLOBS: free space first, then every missing blob (resuming kept partials)."""
        vm, source = ctx.verified, ctx.source
        assert vm is not None and source is not None
        ctx.verified = None
        self.blobs.ensure_dirs()
        files = list(vm.manifest.files.values())
        try:
            self.check_space(files)
            source.fetch_blobs(vm, self.blobs)
        except DiskFullError:
            for ref in files:
                self.blobs.discard(ref.sha256)
            raise
        return m.BlobsPlaced()

    def check_space(self, files: list[FileRef]) -> None:
        """Refuse (DiskFullError) unless state_dir has room for the missing blobs plus the margin."""
        missing = self.blobs.missing(files)
        need = sum(max(0, ref.size - self.blobs.partial_size(ref.sha256)) for ref in missing)
        if not missing:
            return
        free = self.blobs.free_bytes()
        if need + self.disk_margin_bytes > free:
            raise DiskFullError(
                f"state_dir {self.blobs.state_dir} has {free} bytes free; the {len(missing)} missing "
                f"file(s) need {need} bytes plus a margin of {self.disk_margin_bytes}"
            )

    def _recheck(self, rec: ModelRecord, ctx: _Drive) -> m.Event:
        """RECHECK: re-verify the stored envelope and re-hash every blob (once back to
        DOWNLOADING per run; a second damage is a download failure)."""
        assert rec.target is not None
        target = rec.target
        data = self.blobs.load_envelope(rec.name, target.release, target.digest)
        vm = (self._verify(rec.name, target.digest, data, offline=target.bundle_path is not None)
              if data is not None else None)
        damaged = [] if vm is None else [
            ref for ref in vm.manifest.files.values() if not self.blobs.verify_placed(ref)
        ]
        if vm is None or damaged:
            what = "its envelope is missing" if vm is None else f"{len(damaged)} file(s) missing or damaged"
            if ctx.shadow is not None:  # a candidate is staged again at the next pull
                raise HashMismatchError(f"{rec.name} r{target.release}: {what} right after download")
            if ctx.redownloads > 0:
                raise DownloadError(f"{rec.name} r{target.release}: {what} right after download")
            ctx.redownloads += 1
            log.warning("model=%s r%s: %s; downloading again", rec.name, target.release, what)
            return m.Damaged(what)
        return m.Rechecked()

    def _await_activation(self, rec: ModelRecord, ctx: _Drive) -> m.Event:
        """AWAIT_ACTIVATION: a fleet release waits for its window and for update locks."""
        if ctx.trial and ctx.shadow is None and (message := self._activation_wait_message(rec)) is not None:
            return m.Waiting(message)  # staged; activated at the first allowed moment
        return m.ActivationAllowed()

    def _smoke(self, rec: ModelRecord, ctx: _Drive) -> m.Event:
        """SMOKE: a new session on the verified blobs (the old one keeps serving), golden vectors."""
        assert rec.target is not None
        manifest = self._stored_manifest(rec.name, rec.target)
        loaded = self._load(manifest, rec.target.digest)
        self.smoke_test(loaded)
        ctx.loaded[loaded.digest] = loaded
        return m.SmokePassed(ReleaseRef(loaded.release, loaded.digest, manifest.version),
                             self.clock() + self.trial_seconds if ctx.trial else None)

    def _reload_trial(self, rec: ModelRecord) -> m.Event | None:
        """RELOAD_TRIAL: after a restart in TRIAL (already counted and persisted)."""
        assert rec.active is not None
        try:
            self.host.swap(self.load_release(rec.name, rec.active))
        except (EdgefleetError, StateError) as exc:
            return m.TrialFailed(ReasonCode.LOAD, f"r{rec.active.release} cannot be loaded again: {exc}")
        log.warning("model=%s r%s: %s", rec.name, rec.active.release, rec.message)
        return None

    def _load_previous(self, rec: ModelRecord, reason: ReasonCode, message: str,
                       ctx: _Drive) -> m.Event:
        """LOAD_PREVIOUS: leaving a failed trial; without a previous release keep serving."""
        assert rec.active is not None
        if rec.previous is not None:
            try:
                ctx.loaded[rec.previous.digest] = self.load_release(rec.name, rec.previous)
            except (EdgefleetError, StateError) as exc:
                log.error("model=%s cannot reload previous r%s: %s", rec.name, rec.previous.release, exc)
            else:
                return m.PreviousLoaded(reason, message)
        if self.host.get(rec.name) is None:
            self.host.swap(self.load_release(rec.name, rec.active))
        return m.PreviousUnloadable(reason, message)

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

    def _activation_wait_message(self, rec: ModelRecord) -> str | None:
        """Why a staged fleet release may not be activated now (window, update lock), or None."""
        if self.gate is None or rec.target is None:
            return None
        reason = self.gate.waiting_for(rec.target.activation_window)
        if reason is None:
            return None
        message = f"r{rec.target.release} staged, {reason}"
        if rec.message != message:
            log.info("model=%s: %s", rec.name, message)
        return message

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
