"""Named failures. Each carries a stable ``code`` that devices report and docs list."""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every refusal edgefleet makes on purpose."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class MalformedDocumentError(EdgefleetError):
    """A document is not valid JSON, too large, or does not match its schema."""

    code = "malformed"


class SignatureError(EdgefleetError):
    """Signatures do not verify, or too few trusted keys signed."""

    code = "signature"


class ScopeError(SignatureError):
    """The keys that signed are not delegated for this model."""

    code = "scope"


class ExpiredError(EdgefleetError):
    """A signed document (manifest, delegation, root) is past its expiry."""

    code = "expired"


class RollbackError(EdgefleetError):
    """A release older than the highest one seen, or a same-number different bundle."""

    code = "rollback"


class LengthMismatchError(EdgefleetError):
    """A file is shorter or longer than its manifest says."""

    code = "length"


class HashMismatchError(EdgefleetError):
    """A file's SHA-256 differs from its manifest."""

    code = "hash"


class AgentTooOldError(EdgefleetError):
    """The bundle needs a newer agent."""

    code = "agent_version"


class UnsafeArchiveError(EdgefleetError):
    """A bundle archive holds a member that must never be extracted."""

    code = "unsafe_archive"
