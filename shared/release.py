"""Release numbers: the one range the builder, the fleet and the agent accept, and the default
numbering scheme of builds.

A release number orders the builds of one model: a device accepts a release only above the
highest it has accepted (anti-rollback), so a number is never reused and never goes down.

- Range: ``MIN_RELEASE`` .. ``MAX_RELEASE`` (1 .. 2**53 - 1), the integers every JSON reader
  holds exactly (a JavaScript dashboard included) and a BIGINT column stores.
- Default scheme (``next_release``): the build's Unix time in *milliseconds*, but at least one
  above the highest release known for the model (the builder's ledger, the fleet's registry).
  Builds a millisecond apart, or built while the clock is behind, still get distinct, growing
  numbers; releases numbered by the old scheme (Unix seconds, about 1.8e9) stay below every
  millisecond number (about 1.8e12).
"""

from __future__ import annotations

from shared.errors import EdgefleetError, MalformedDocumentError

MIN_RELEASE = 1
MAX_RELEASE = 2**53 - 1


class ReleaseRangeError(MalformedDocumentError):
    """A release number outside MIN_RELEASE .. MAX_RELEASE (or not an integer)."""


class ReleaseNotAboveError(EdgefleetError):
    """A chosen release number that is not above the highest already known for its model:
    a device that accepted the higher one would refuse it (anti-rollback)."""

    code = "rollback"


def validate_release(value: object, *, what: str = "release") -> int:
    """``value`` as a release number; ReleaseRangeError naming the value and the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReleaseRangeError(
            f"{what} {value!r} is not an integer; release numbers are integers "
            f"{MIN_RELEASE} .. {MAX_RELEASE}",
            value=repr(value), min=MIN_RELEASE, max=MAX_RELEASE,
        )
    if not MIN_RELEASE <= value <= MAX_RELEASE:
        raise ReleaseRangeError(
            f"{what} {value} is out of range; release numbers are {MIN_RELEASE} .. {MAX_RELEASE}",
            value=value, min=MIN_RELEASE, max=MAX_RELEASE,
        )
    return value


def is_release(value: object) -> bool:
    """Whether ``value`` is a release number (an int in range; not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_RELEASE <= value <= MAX_RELEASE


def next_release(now_ms: int, known_highest: int = 0) -> int:
    """The default release of a new build: ``max(now_ms, known_highest + 1)``."""
    release = max(now_ms, known_highest + 1)
    return validate_release(release, what="next release")


def check_explicit_release(release: int, known_highest: int, *, model: str, source: str) -> int:
    """An operator-chosen release must be in range and above ``known_highest`` (from
    ``source``: the ledger, the fleet); else ReleaseNotAboveError with the number to use."""
    validate_release(release)
    if release <= known_highest:
        raise ReleaseNotAboveError(
            f"{model} release {release} is not above release {known_highest} already issued "
            f"({source}); a device that accepted r{known_highest} would refuse it. "
            f"Use --release {known_highest + 1} or higher, or leave --release out",
            release=release, highest=known_highest, source=source,
        )
    return release
