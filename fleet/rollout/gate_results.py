"""What a gate says (``GateResult``: PASS, FAIL or WAIT with what explains it: observed value,
threshold, sample and minimum) and the sample rules every gate shares."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleet.rollout.progress import SETTLED_BAD
from fleet.rollout.reports import GateInput


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


@dataclass(frozen=True)
class GateResult:
    gate: str
    status: GateStatus
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    observed: float | None = None
    threshold: float | None = None
    sample: int = 0
    min_sample: int = 0
    unit: str = "devices"

    @property
    def short_of_sample(self) -> str:
        """'gate G has N of M <unit>' for an inconclusive result."""
        return f"gate {self.gate} has {self.sample} of {self.min_sample} {self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "status": self.status.value,
            "observed": self.observed,
            "threshold": self.threshold,
            "sample": self.sample,
            "min_sample": self.min_sample,
            "unit": self.unit,
            "message": self.message,
            "figures": self.figures,
        }


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_of(sample: int, need: int, unit: str) -> str:
    return f"needs {need} {unit}, has {sample}"


def devices_needed(inp: GateInput, refused_only: Collection[str]) -> int:
    """Devices that must have reported (an accepted window, traffic or not) before a rate,
    ratio or drift gate decides, pass or fail: enough that the devices set aside can be set
    aside (2 x ``trim_devices`` + 1), or every member still expected to report when the stage
    has fewer — not failed, rolled back or silent, and not a device whose every report was
    refused. So the device that reports first (a fake one needs no download) cannot decide
    the stage alone before the others report."""
    expected = sum(
        1 for d in inp.members
        if ((p := inp.progress.get(d.device_id)) is None or p.progress not in SETTLED_BAD)
        and d.device_id not in refused_only
    )
    return min(2 * inp.gates.trim_devices + 1, expected)


def _health_reported(inp: GateInput) -> tuple[int, int]:
    """(devices with an accepted window, devices the health gates need)."""
    refused_only = {d for d, e in inp.evidence.items() if e.refused and not e.windows}
    reported = sum(1 for e in inp.evidence.values() if e.windows)
    return reported, devices_needed(inp, refused_only)


def too_few_reported(inp: GateInput, gate: str, label: str, common: dict[str, Any]) -> GateResult | None:
    reported, needed = _health_reported(inp)
    if reported >= needed:
        return None
    return GateResult(gate, GateStatus.WAIT, f"{label} {short_of(reported, needed, 'devices')} reporting",
                      sample=reported, min_sample=needed, **common)
