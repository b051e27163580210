"""Agent-side failures. Refusals during an update carry a ``code`` from
shared.telemetry.messages.REASON_CODES, like the shared errors do."""

from __future__ import annotations

from shared.errors import EdgefleetError


class ConfigError(Exception):
    """The config file is missing, unreadable, or holds an unknown key or a bad value."""


class StateError(Exception):
    """The persisted state in state_dir cannot be trusted (corrupt, unreadable, locked)."""


class DownloadError(EdgefleetError):
    """A network or HTTP error while fetching an envelope or a blob (retried later)."""

    code = "download"


class AuthError(DownloadError):
    """The fleet refused the device credential (HTTP 401); the agent re-enrolls."""


class DiskFullError(EdgefleetError):
    """Not enough space in state_dir to stage a bundle."""

    code = "disk_full"


class LoadError(EdgefleetError):
    """The inference runtime could not load the model."""

    code = "load"


class SmokeTestError(EdgefleetError):
    """The model's outputs on its golden inputs differ from the golden outputs."""

    code = "smoke_test"


class SupersededError(EdgefleetError):
    """The fleet asked for another release while this one was being installed."""

    code = "superseded"


class InputError(Exception):
    """An inference request does not match the model's input signature (a client error)."""


class InferenceError(Exception):
    """The runtime failed while running a valid request (counted as an inference error)."""


class UnknownModelError(Exception):
    """No active model has this name."""
