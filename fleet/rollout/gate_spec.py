"""Gate thresholds of a rollout spec (``Gates``) and their validation; ``SpecError`` names the
field of a spec that cannot be run."""

from __future__ import annotations

import math

import msgspec

from shared.errors import EdgefleetError


class SpecError(EdgefleetError):
    """A rollout spec that cannot be run; ``field`` names the offending field."""

    code = "rollout_spec"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}", field=field_name)
        self.field = field_name


class Gates(msgspec.Struct, forbid_unknown_fields=True):
    """Gate thresholds (None: the gate is off) and the minimum sample they need."""

    max_error_rate: float | None = None
    max_latency_ratio: float | None = None
    max_drift: float | None = None
    max_install_failures: int | None = None
    max_local_rollbacks: int | None = 0
    max_silent_devices: int | None = 0
    max_offline_fraction: float | None = None
    min_inferences: int = 0
    min_devices: int = 1
    # Device claims (fleet.rollout.evidence): the most inferences per second one device could
    # serve (more is refused as implausible), and how many devices the rate, latency and drift
    # gates set aside at each end (highest and lowest figures) before they weigh the rest.
    max_device_rate: float = 2000.0
    trim_devices: int = 1
    # Shadow gates: judged in shadow stages only, on the candidate's figures (ShadowFigures).
    min_agreement: float | None = None
    max_abs_error: float | None = None
    min_cosine: float | None = None
    max_candidate_p95_ratio: float | None = None
    min_shadow_samples: int = 0

    def has_shadow_gate(self) -> bool:
        return any(v is not None for v in (self.min_agreement, self.max_abs_error, self.min_cosine))


def validate_gates(g: Gates, where: str) -> Gates:
    def bad(name: str, message: str) -> SpecError:
        return SpecError(f"{where}.{name}", message)

    for name in ("max_error_rate", "max_offline_fraction"):
        value = getattr(g, name)
        if value is not None and not 0 <= value <= 1:
            raise bad(name, f"{value} must be in [0, 1]")
    if g.max_latency_ratio is not None and g.max_latency_ratio <= 0:
        raise bad("max_latency_ratio", f"{g.max_latency_ratio} must be > 0 (e.g. 1.5)")
    if g.max_drift is not None and g.max_drift < 0:
        raise bad("max_drift", f"{g.max_drift} must be >= 0")
    for name in ("max_install_failures", "max_local_rollbacks", "max_silent_devices", "min_inferences"):
        value = getattr(g, name)
        if value is not None and value < 0:
            raise bad(name, f"{value} must be >= 0")
    if g.min_devices < 1:
        raise bad("min_devices", f"{g.min_devices} must be >= 1")
    if not (math.isfinite(g.max_device_rate) and g.max_device_rate > 0):
        raise bad("max_device_rate", f"{g.max_device_rate} must be > 0 (inferences per second of one device)")
    if g.trim_devices < 0:
        raise bad("trim_devices", f"{g.trim_devices} must be >= 0")
    if g.min_agreement is not None and not 0 <= g.min_agreement <= 1:
        raise bad("min_agreement", f"{g.min_agreement} must be in [0, 1]")
    if g.min_cosine is not None and not -1 <= g.min_cosine <= 1:
        raise bad("min_cosine", f"{g.min_cosine} must be in [-1, 1]")
    if g.max_abs_error is not None and g.max_abs_error < 0:
        raise bad("max_abs_error", f"{g.max_abs_error} must be >= 0")
    if g.max_candidate_p95_ratio is not None and g.max_candidate_p95_ratio <= 0:
        raise bad("max_candidate_p95_ratio", f"{g.max_candidate_p95_ratio} must be > 0 (e.g. 1.5)")
    if g.min_shadow_samples < 0:
        raise bad("min_shadow_samples", f"{g.min_shadow_samples} must be >= 0")
    return g
