"""Fleet-side named refusals; the API maps their codes to HTTP statuses."""

from __future__ import annotations

from shared.errors import EdgefleetError


class NotFoundError(EdgefleetError):
    """An id that names nothing (device, bundle, rollout, blob)."""

    code = "not_found"


class ConflictError(EdgefleetError):
    """The request collides with what exists (a release number, a running rollout)."""

    code = "conflict"
