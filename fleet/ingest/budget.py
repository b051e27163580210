"""Per-device budgets of telemetry at the fleet: messages and bytes per minute, health rows per
minute, each a token bucket whose burst covers an agent's store-and-forward spool flushing
after an outage. Pure (time is an argument); the ingester asks before it decodes a message,
so a device over its budget costs a dict lookup, not a decode or a database write.

Each ingester process keeps its own buckets: with N ingesters sharing the stream (MQTT shared
subscriptions) a device's messages are spread over them, so its budget is up to N times the
figures here. The broker's own limits (packaging/mosquitto) bound a message's size first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import EdgefleetError

SWEEP_EVERY = 10_000  # new devices between sweeps of idle buckets


class BudgetExceeded(EdgefleetError):
    """A device past one of its budgets: which, what the message needed, what was left."""

    code = "over_budget"

    def __init__(self, budget: str, needed: float, left: float, rate_per_min: float, burst: float) -> None:
        super().__init__(
            f"{budget} budget: needs {needed:g}, {left:.0f} left "
            f"(refills {rate_per_min:g}/min, burst {burst:g})",
            budget=budget, needed=needed, left=left, rate_per_min=rate_per_min, burst=burst,
        )
        self.budget = budget


@dataclass(frozen=True)
class Budget:
    """The budget of one device (docs/telemetry.md "Budgets"); a rate of 0 turns it off."""

    messages_per_min: float = 60.0
    messages_burst: float = 20_000.0
    bytes_per_min: float = 256 * 1024.0
    bytes_burst: float = 8 * 1024 * 1024.0  # the agent's default spool
    rows_per_min: float = 600.0
    rows_burst: float = 50_000.0


@dataclass
class _Buckets:
    at: float
    messages: float
    bytes: float
    rows: float


@dataclass
class DeviceBudgets:
    budget: Budget = field(default_factory=Budget)
    _buckets: dict[str, _Buckets] = field(default_factory=dict)
    _added: int = 0

    def _refilled(self, device_id: str, now: float) -> _Buckets:
        b = self.budget
        buckets = self._buckets.get(device_id)
        if buckets is None:
            buckets = self._buckets[device_id] = _Buckets(now, b.messages_burst, b.bytes_burst, b.rows_burst)
            self._added += 1
            if self._added % SWEEP_EVERY == 0:
                self._sweep(now)
            return buckets
        minutes = max(0.0, now - buckets.at) / 60.0
        buckets.at = now
        buckets.messages = min(b.messages_burst, buckets.messages + minutes * b.messages_per_min)
        buckets.bytes = min(b.bytes_burst, buckets.bytes + minutes * b.bytes_per_min)
        buckets.rows = min(b.rows_burst, buckets.rows + minutes * b.rows_per_min)
        return buckets

    def take_message(self, device_id: str, nbytes: int, now: float) -> None:
        """Spend one message and its bytes, or raise ``BudgetExceeded`` (nothing spent)."""
        b = self.budget
        buckets = self._refilled(device_id, now)
        if b.messages_per_min and buckets.messages < 1:
            raise BudgetExceeded("messages", 1, buckets.messages, b.messages_per_min, b.messages_burst)
        if b.bytes_per_min and buckets.bytes < nbytes:
            raise BudgetExceeded("bytes", nbytes, buckets.bytes, b.bytes_per_min, b.bytes_burst)
        buckets.messages -= 1
        buckets.bytes -= nbytes

    def take_rows(self, device_id: str, rows: int, now: float) -> None:
        """Spend the rows a message stores (a health message: one per model), or raise."""
        b = self.budget
        buckets = self._refilled(device_id, now)
        if b.rows_per_min and buckets.rows < rows:
            raise BudgetExceeded("rows", rows, buckets.rows, b.rows_per_min, b.rows_burst)
        buckets.rows -= rows

    def _sweep(self, now: float) -> None:
        """Forget devices whose buckets are full again (idle): memory stays bounded by the active ones."""
        b = self.budget
        pairs = ((b.messages_burst, b.messages_per_min), (b.bytes_burst, b.bytes_per_min),
                 (b.rows_burst, b.rows_per_min))
        full_after = 60.0 * max((burst / rate for burst, rate in pairs if rate), default=0.0)
        idle = [d for d, k in self._buckets.items() if now - k.at >= full_after]
        for d in idle:
            del self._buckets[d]
