"""Staging a candidate release for shadow evaluation (docs/rollouts.md "Shadow stages").

The fleet's desired state may name, per model, a candidate to run *beside* the serving
release. The candidate is a second record in the same update machine (agent.update.machine,
run by ``Installer.stage_shadow``): it goes through the same steps and checks as an update — envelope verified
before any big byte (signatures, scope, expiry, agent version, anti-rollback), files
fetched length-capped and hash-checked, re-hashed in place, loaded in a new session and
smoke-tested on its golden vectors — but it never becomes active: the model's record, its
state and the anti-rollback floor are left alone, and the active release keeps serving.
``agent.runtime.shadow.ShadowRunner`` then runs it on a sample of live requests.

Rules:
- the candidate's record lives in memory (``ShadowStager.records``); its effects never
  swap it in nor raise the floor, and of its events the fleet sees ``verified``, ``failed``
  and, once it runs beside the serving release, ``staged``;
- nothing persisted but the verified envelope and blobs (kept by the garbage collection
  while the candidate is shadowed); after a restart the next desired-state pull stages it
  again, reusing the placed files;
- a model whose record is mid-update is not shadowed until the update ends;
- a refusal emits a ``failed`` event for the candidate with its reason code (the fleet
  counts it as an install failure of the stage); refusals of the bundle itself are not
  retried with the same digest, ``download``/``disk_full`` after ``retry_failed_s``;
- the candidate is dropped when the desired state no longer names it, or names it as the
  release to switch to (the update then activates it through the normal lifecycle).
"""

from __future__ import annotations

import logging
import time

import msgspec

from agent.runtime.host import LoadedModel
from agent.runtime.shadow import ShadowPolicy, ShadowRunner
from agent.update import lifecycle as lc
from agent.update.fetch import Cancelled
from agent.update.installer import RETRYABLE, Installer
from agent.update.lifecycle import ModelRecord, ReleaseRef, Target
from agent.update.runner import _reason
from shared.errors import EdgefleetError

log = logging.getLogger(__name__)


class ShadowTarget(msgspec.Struct, frozen=True):
    target: Target
    policy: ShadowPolicy


class ShadowStager:
    def __init__(self, installer: Installer) -> None:
        self.installer = installer
        # digest -> (reason, when): refusals, so a bad candidate is not fetched at every poll
        self._failed: dict[str, tuple[str, float]] = {}
        # model -> the candidate's own record in the update machine (in memory, never persisted)
        self.records: dict[str, ModelRecord] = {}

    def sync(self, wanted: dict[str, ShadowTarget]) -> None:
        """Make the shadowed candidates those of ``wanted`` (model -> candidate)."""
        inst = self.installer
        for name in list(inst.shadow_refs):
            if name not in wanted:
                self.drop(name, "the fleet no longer asks for it")
        for name, want in sorted(wanted.items()):
            try:
                self.apply(name, want)
            except Exception:
                log.exception("model=%s: staging shadow r%s failed", name, want.target.release)
                self._forget(name)

    def drop(self, name: str, why: str) -> None:
        inst = self.installer
        ref = inst.shadow_refs.pop(name, None)
        runner = inst.host.clear_shadow(name)
        self.records.pop(name, None)
        if ref is not None or runner is not None:
            log.info("model=%s: shadow r%s stopped: %s", name, ref.release if ref else "?", why)
            inst.gc()

    def apply(self, name: str, want: ShadowTarget) -> None:
        inst = self.installer
        target = want.target
        rec = inst.store.load(name)
        active = rec.active if rec is not None else None
        if active is None or inst.host.get(name) is None:
            self.drop(name, "no release serves this model to compare with")
            return
        if active.digest == target.digest:
            self.drop(name, f"r{target.release} is the serving release now")
            return
        if rec is not None and rec.state in lc.IN_PROGRESS:
            return  # an update of this model is under way; shadow once it ends
        current = inst.host.shadow(name)
        if current is not None and current.digest == target.digest:
            if current.policy != want.policy:
                # new rate or budget: a fresh runner on the same session, figures restart
                inst.host.set_shadow(name, ShadowRunner(current.candidate, want.policy))
            return
        failed = self._failed.get(target.digest)
        if failed is not None:
            reason, when = failed
            if reason not in RETRYABLE or time.time() < when + inst.retry_failed_s:
                return
        if inst.fetcher is None or inst.fetcher.waiting_reason() is not None:
            return  # no fleet, or a metered link outside its window: try at a later pull
        self._stage(name, target, want.policy, active)

    def _stage(self, name: str, target: Target, policy: ShadowPolicy, active: ReleaseRef) -> None:
        """Run the candidate's own record through the update machine (agent.update.machine):
        the same verify -> fetch -> re-check -> smoke steps, kept in memory, served beside
        ``active`` instead of replacing it."""
        inst = self.installer
        note = (f"shadow: r{target.release} runs beside r{active.release} on "
                f"{policy.sample_rate:g} of requests (CPU budget {policy.max_busy_fraction:g})")

        def serve(loaded: LoadedModel) -> None:
            inst.host.set_shadow(name, ShadowRunner(loaded, policy))

        inst.shadow_refs[name] = target  # the gc keeps its files from now on
        try:
            self.records[name] = inst.stage_shadow(
                ModelRecord(name=name, active=active), target, serve=serve, note=note)
        except Cancelled:  # stopping, or the metered window ended
            self._forget(name)
        except EdgefleetError as exc:  # the machine emitted the candidate's failed event
            self._forget(name)
            reason = _reason(exc)
            self._failed[target.digest] = (reason, time.time())
            log.warning("model=%s shadow r%s refused: %s: %s", name, target.release, reason, exc)

    def _forget(self, name: str) -> None:
        self.installer.shadow_refs.pop(name, None)
        self.installer.host.clear_shadow(name)
        self.records.pop(name, None)
