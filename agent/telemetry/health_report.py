"""Health-report assembly: what one ``Health`` message says about the device and its models.

- per model served: release and version, its update state (``states``) and extra fields
  (``model_details``: update ``waiting``, ``held`` releases), inference and error counts of
  the window since the last report and in total, latency percentiles, drift, the shadow
  candidate's figures, and the latest lifecycle event published for it (``last_event``,
  kept in memory since the start), so the fleet recovers an event that reached the broker
  but not the fleet;
- the device: the agent's CPU and memory, the machine's CPU and memory, free disk in the
  state directory, the hottest temperature sensor, uptime, and the spool's figures
  (pending, dropped by kind).

Nothing here talks to the broker: agent.telemetry.reporter numbers, spools and sends the
messages. psutil is imported with the first assembler (an agent without telemetry never
imports it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.runtime.host import ModelHost
from agent.telemetry.sequence import SeqCounter
from agent.telemetry.spool import Spool
from shared.telemetry import messages


def temperature() -> float | None:
    """The hottest sensor psutil reports (°C); None where there is none (containers, macOS)."""
    import psutil

    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    try:
        readings = sensors()
    except (OSError, RuntimeError, AttributeError):
        return None
    values = [float(e.current) for entries in readings.values() for e in entries
              if e.current is not None and -40.0 < e.current < 200.0]
    return round(max(values), 1) if values else None


class HealthAssembler:
    """Builds the device's ``Health`` messages and keeps, per model, the latest lifecycle
    event published (``remember``), which every health message repeats."""

    def __init__(
        self,
        *,
        device_id: str,
        host: ModelHost,
        state_dir: Path,
        seq: SeqCounter,
        spool: Spool,
        interval_s: float,
        states: Callable[[], dict[str, str]] = dict,
        model_details: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.device_id = device_id
        self.host = host
        self.state_dir = Path(state_dir)
        self.seq = seq
        self.spool = spool
        self.interval_s = interval_s
        self.states = states
        self.model_details = model_details
        self.started = time.monotonic()
        self._last_events: dict[str, messages.LastEvent] = {}
        self._last_events_lock = threading.Lock()
        import psutil

        self._process = psutil.Process()
        with contextlib.suppress(psutil.Error):
            self._process.cpu_percent(None)  # the first call only starts the measurement
        psutil.cpu_percent(None)

    def remember(self, event: messages.Event) -> None:
        """``event`` is the latest lifecycle event published for its model. The caller
        holds its emit order: a health numbered after the event carries it (or a later one)."""
        last = messages.LastEvent(seq=event.seq, ts=event.ts, kind=event.kind, release=event.release,
                                  from_release=event.from_release, reason=event.reason)
        with self._last_events_lock:
            self._last_events[event.model] = last

    def last_events(self) -> dict[str, messages.LastEvent]:
        """Per model, the latest lifecycle event published since the agent started."""
        with self._last_events_lock:
            return dict(self._last_events)

    def build(self, *, reset_window: bool = True, seq: int | None = None) -> messages.Health:
        """One health message; ``seq`` numbered here when not given. ``reset_window`` starts
        each model's next window of counts and latencies."""
        last_events = self.last_events()  # before the states: a state is never older than its event
        states = self.states()
        details = self.model_details() if self.model_details is not None else {}
        models = []
        for name, loaded in sorted(self.host.snapshot().items()):
            snap = loaded.metrics.snapshot(reset_window=reset_window)
            models.append(messages.ModelHealth(
                name=name, release=loaded.release, version=loaded.manifest.version,
                state=states.get(name, "idle"), inferences=snap.inferences, errors=snap.errors,
                total_inferences=snap.total_inferences, total_errors=snap.total_errors,
                latency_p50_ms=snap.latency_p50_ms, latency_p95_ms=snap.latency_p95_ms,
                drift=snap.drift, drift_inputs=snap.drift_inputs,
                shadow=self.host.shadow_health(name), last_event=last_events.get(name),
                **details.get(name, {})))
        import psutil

        try:
            disk_free = psutil.disk_usage(str(self.state_dir)).free / 1e6
        except OSError:
            disk_free = 0.0
        try:
            with self._process.oneshot():
                cpu = self._process.cpu_percent(None)
                rss = self._process.memory_info().rss / 1e6
        except psutil.Error:
            cpu = rss = 0.0
        spool = self.spool.stats()
        return messages.Health(
            v=messages.VERSION, device_id=self.device_id, seq=self.seq.next() if seq is None else seq,
            ts=time.time(), interval_s=self.interval_s, models=models,
            cpu_percent=round(cpu, 1), mem_rss_mb=round(rss, 2),
            mem_percent=psutil.virtual_memory().percent,
            disk_free_mb=round(disk_free, 1), temperature_c=temperature(),
            uptime_s=round(time.monotonic() - self.started, 1), dropped=sum(spool.dropped.values()),
            dropped_health=spool.dropped["health"], dropped_events=spool.dropped["event"],
            spooled=spool.pending, device_cpu_percent=psutil.cpu_percent(None), session=self.seq.session)
