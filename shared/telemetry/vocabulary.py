"""The update vocabulary both sides speak: update states, event kinds, reason codes.

One list each, as string enums: the agent's lifecycle (agent.update.lifecycle,
agent.update.machine) and the fleet (ingestion, rollout gates and stall detection) import
these rather than re-listing the strings. A StrEnum member equals its text, so the wire
format (JSON and MessagePack strings) is unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class UpdateState(StrEnum):
    """A model's update lifecycle state on the device (docs/agent-lifecycle.md)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    SMOKE_TESTING = "smoke_testing"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class EventKind(StrEnum):
    """What an update event reports; the agent emits them from its machine's transitions."""

    DOWNLOAD_STARTED = "download_started"
    VERIFIED = "verified"
    STAGED = "staged"
    SMOKE_PASSED = "smoke_passed"
    ACTIVATED = "activated"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class ReasonCode(StrEnum):
    """Why an update failed or rolled back on the device."""

    SIGNATURE = "signature"  # signatures did not verify or threshold not met
    SCOPE = "scope"  # signing keys not delegated for this model
    EXPIRED = "expired"  # manifest, delegation or root past expiry
    ROLLBACK = "rollback"  # release older than (or same number as) one already accepted
    AGENT_VERSION = "agent_version"  # bundle needs a newer agent
    MALFORMED = "malformed"  # manifest or file not in the expected format
    LENGTH = "length"  # a file longer or shorter than the manifest says
    HASH = "hash"  # a file's hash differs from the manifest
    DOWNLOAD = "download"  # network or HTTP error fetching a file
    DISK_FULL = "disk_full"  # not enough space to stage the bundle
    LOAD = "load"  # the runtime could not load the model
    SMOKE_TEST = "smoke_test"  # golden vectors did not match
    TRIAL_ERRORS = "trial_errors"  # error rate during the trial window past the local bound
    TRIAL_LATENCY = "trial_latency"  # p95 in trial past the local bound x the previous release's
    RUNTIME_CRASH = "runtime_crash"  # the process died while the release was on trial
    SUPERSEDED = "superseded"  # the fleet asked for another release mid-update


# Reasons that refuse the release itself: the same digest is never tried again on the
# device, and the fleet counts the device as refusing (fleet.rollout.stalls).
REFUSAL_REASONS = frozenset({
    ReasonCode.ROLLBACK, ReasonCode.SIGNATURE, ReasonCode.SCOPE, ReasonCode.EXPIRED,
    ReasonCode.AGENT_VERSION, ReasonCode.MALFORMED,
})
# Failures the agent retries with the same digest (the bundle itself is not at fault).
RETRYABLE_REASONS = frozenset({ReasonCode.DOWNLOAD, ReasonCode.DISK_FULL, ReasonCode.SUPERSEDED})
# The reason codes as texts (shared.telemetry.messages.REASON_CODES), and the telemetry
# encodings (messages.ENCODINGS): here, so that the agent's start, which checks a record's
# reason and the config's encoding, does not import the message Structs.
REASON_CODES = tuple(r.value for r in ReasonCode)
ENCODINGS = ("json", "msgpack")
