"""Per-device budgets of telemetry at the fleet: messages and bytes per minute, health rows per
minute, each a token bucket whose burst covers an agent's store-and-forward spool flushing
after an outage. Pure (time is an argument); the ingester asks before it decodes a message,
so a device over its budget costs a dict lookup, not a decode or a database write.

Each ingester process keeps its own buckets: with N ingesters sharing the stream (MQTT shared
subscriptions) a device's messages are spread over them, so its budget is up to N times the
figures here. The broker's own limits (packaging/mosquitto) bound a message's size first.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class DeviceBudgets:
    """Every device's buckets: [at, messages, bytes, rows] (a list: this runs per message)."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = b = budget or Budget()
        self._rates = (b.messages_per_min / 60.0, b.bytes_per_min / 60.0, b.rows_per_min / 60.0)
        self._bursts = (b.messages_burst, b.bytes_burst, b.rows_burst)
        self._buckets: dict[str, list[float]] = {}
        self._added = 0

    def _refilled(self, device_id: str, now: float) -> list[float]:
        k = self._buckets.get(device_id)
        if k is None:
            k = self._buckets[device_id] = [now, *self._bursts]
            self._added += 1
            if self._added % SWEEP_EVERY == 0:
                self._sweep(now)
            return k
        dt = now - k[0]
        if dt > 0:
            k[0] = now
            (rm, rb, rr), (bm, bb, br) = self._rates, self._bursts
            m, by, r = k[1] + dt * rm, k[2] + dt * rb, k[3] + dt * rr
            k[1] = m if m < bm else bm
            k[2] = by if by < bb else bb
            k[3] = r if r < br else br
        return k

    def take_message(self, device_id: str, nbytes: int, now: float) -> None:
        """Spend one message and its bytes, or raise ``BudgetExceeded`` (nothing spent)."""
        k = self._refilled(device_id, now)
        b = self.budget
        if b.messages_per_min and k[1] < 1:
            raise BudgetExceeded("messages", 1, k[1], b.messages_per_min, b.messages_burst)
        if b.bytes_per_min and k[2] < nbytes:
            raise BudgetExceeded("bytes", nbytes, k[2], b.bytes_per_min, b.bytes_burst)
        k[1] -= 1
        k[2] -= nbytes

    def take_rows(self, device_id: str, rows: int, now: float) -> None:
        """Spend the rows a message stores (a health message: one per model), or raise."""
        k = self._refilled(device_id, now)
        b = self.budget
        if b.rows_per_min and k[3] < rows:
            raise BudgetExceeded("rows", rows, k[3], b.rows_per_min, b.rows_burst)
        k[3] -= rows

    def _sweep(self, now: float) -> None:
        """Forget devices whose buckets are full again (idle): memory stays bounded by the active ones."""
        pairs = zip(self._bursts, self._rates, strict=True)
        full_after = max((burst / rate for burst, rate in pairs if rate), default=0.0)
        idle = [d for d, k in self._buckets.items() if now - k[0] >= full_after]
        for d in idle:
            del self._buckets[d]
