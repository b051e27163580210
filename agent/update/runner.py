"""The runner of the update machine (agent.update.machine): performs its effects in order.

The machine decides (``step(record, event, now) -> (record, effects)``); this module
performs the effects: persist a record (agent.update.store), emit a telemetry event, swap the
serving session, raise the anti-rollback floor, pause at a test checkpoint, and do the I/O
work of a state, which ends with the next event:

    FETCH             fetch the envelope (or read it from a bundle file), verify signatures,
                      scope, expiry, agent version and anti-rollback BEFORE any model byte;
                      store it                                          -> EnvelopeVerified
    FETCH_BLOBS       check free space for the missing blobs; fetch (resuming kept
                      partials) or extract each blob the store lacks    -> BlobsPlaced
    RECHECK           re-verify the stored envelope, re-hash every blob not proven while
                      placed in this run (BlobsPlaced.proven)           -> Rechecked | Damaged
    AWAIT_ACTIVATION  the activation window and update locks (fleet releases only)
                                                                        -> ActivationAllowed | Waiting
    SMOKE             load in a NEW session (old one keeps serving), golden vectors
                                                                        -> SmokePassed
    RELOAD_TRIAL      load the release on trial again after a restart   -> nothing | TrialFailed
    LOAD_PREVIOUS     load the previous release to roll back to         -> PreviousLoaded | PreviousUnloadable

A failure of the work (a named EdgefleetError, an I/O error) becomes the machine's
``Failed`` event with its reason code; the active model is untouched. A shadow candidate's
effects (``_Drive.shadow``) keep its record in memory: it serves beside the active release
and never raises the floor. The entry points that start a run are in agent.update.installer.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from agent.errors import (
    DiskFullError,
    DownloadError,
    StateError,
)
from agent.runtime.host import LoadedModel, ModelHost
from agent.update import lifecycle as lc
from agent.update import machine as m
from agent.update.blobs import disk_full
from agent.update.fetch import Cancelled, Fetcher
from agent.update.gating import ActivationGate
from agent.update.lifecycle import ModelRecord, ReleaseRef
from agent.update.release_checks import ReleaseChecks
from agent.update.testhooks import pause_point
from shared.bundle.manifest import FileRef
from shared.bundle.trust import VerifiedManifest
from shared.errors import EdgefleetError, HashMismatchError, MalformedDocumentError
from shared.telemetry.vocabulary import EventKind, ReasonCode

if TYPE_CHECKING:  # the sources (tarfile, chunked downloads) load with the first bundle driven
    from agent.update.sources import BundleSource

# The installer's logger: operators grep one name for everything an update did.
log = logging.getLogger("agent.update.installer")

EventSink = Callable[[str, str, int, int | None, str | None, str], None]


def _reason(exc: EdgefleetError) -> ReasonCode:
    try:
        return ReasonCode(exc.code)
    except ValueError:
        return ReasonCode.MALFORMED


class _Drive(msgspec.Struct):
    """What one run of the machine needs besides the record: where the bundle comes from,
    whether it activates on trial (fleet) or commits at once (offline), and what the work
    of one step hands to the next (the verified envelope, the sessions loaded to swap in)."""

    source: BundleSource | None = None
    trial: bool = True
    verified: VerifiedManifest | None = None
    redownloads: int = 0
    loaded: dict[str, LoadedModel] = msgspec.field(default_factory=dict)
    record: ModelRecord | None = None
    # A shadow candidate's record (agent.update.shadow_stage): kept in memory, never gated,
    # never swapped in nor raising the floor; ``shadow`` serves the loaded candidate beside
    # the active release, and only the events the fleet counts for a shadow are published.
    shadow: Callable[[LoadedModel], None] | None = None
    shadow_note: str = ""



class EffectRunner(ReleaseChecks):
    """Performs the machine's effects; the installer (agent.update.installer) assembles the
    attributes below and starts runs from its entry points."""

    host: ModelHost
    fetcher: Fetcher | None
    gate: ActivationGate | None
    clock: Callable[[], float]
    trial_seconds: float
    disk_margin_bytes: int
    retry_failed_s: float
    retry_failed_max_s: float
    _emit: EventSink | None
    # latencies of the release a trial replaced, per model (judge_trial: trial_latency)
    _replaced_latencies: dict[str, list[float]]

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
            return self._recheck(rec, ctx, do.proven)
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
        from agent.update.sources import FileSource

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
            proven = source.fetch_blobs(vm, self.blobs)
        except DiskFullError:
            for ref in files:
                self.blobs.discard(ref.sha256)
            raise
        return m.BlobsPlaced(proven)

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

    def _recheck(self, rec: ModelRecord, ctx: _Drive, proven: frozenset[str] = frozenset()) -> m.Event:
        """RECHECK: re-verify the stored envelope and re-hash every blob (once back to
        DOWNLOADING per run; a second damage is a download failure). A blob in ``proven`` was
        hashed whole on the bytes written by this run's FETCH_BLOBS, before it was placed: it
        must still be there at its size, and is not hashed a second time."""
        assert rec.target is not None
        target = rec.target
        data = self.blobs.load_envelope(rec.name, target.release, target.digest)
        vm = (self._verify(rec.name, target.digest, data, offline=target.bundle_path is not None)
              if data is not None else None)
        damaged = [] if vm is None else [
            ref for ref in vm.manifest.files.values()
            if not (self.blobs.has(ref) if ref.sha256 in proven else self.blobs.verify_placed(ref))
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

