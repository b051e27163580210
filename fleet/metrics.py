"""Prometheus metrics of a fleet process, served at ``GET /metrics``.

Counters and histograms live in one registry per process (``REGISTRY``); what the
database knows (devices online, rollouts by state) is read when Prometheus scrapes.
Other parts report through the small functions here, e.g. the rollout controller calls
``record_gate(gate, result)`` for each gate it evaluates; the figures of the running
rollouts' gates (observed, threshold, sample) are read from the database at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fleet.rollout.engine import RolloutState

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "edgefleet_http_requests", "HTTP requests by route template, method and status",
    ["method", "route", "status"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "edgefleet_http_request_duration_seconds", "HTTP request latency by route template",
    ["method", "route"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HTTP_DENIED = Counter(
    "edgefleet_http_denied", "Requests refused for access (401, 403) or rate (429), by reason",
    ["status", "reason"], registry=REGISTRY,
)
INGEST_RECEIVED = Counter(
    "edgefleet_ingest_received", "MQTT telemetry messages received, by kind", ["kind"], registry=REGISTRY,
)
INGEST_WRITTEN = Counter(
    "edgefleet_ingest_written", "Telemetry messages written to the database", registry=REGISTRY,
)
INGEST_REJECTED = Counter(
    "edgefleet_ingest_rejected", "Telemetry messages refused, by reason", ["reason"], registry=REGISTRY,
)
INGEST_LAG = Histogram(
    "edgefleet_ingest_lag_seconds", "Time from a message's own timestamp to its database write",
    registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
INGEST_QUEUE = Gauge(
    "edgefleet_ingest_queue_depth", "Messages waiting for the database writer", registry=REGISTRY,
)
GATE_EVALUATIONS = Counter(
    "edgefleet_gate_evaluations", "Rollout health gate evaluations by gate and result",
    ["gate", "result"], registry=REGISTRY,
)
# Each gate of the running and paused rollouts' current stage, by its key in gate_results.
GATE_FIGURES = {
    key: Gauge(f"edgefleet_rollout_gate_{key}", help_text, ["rollout", "stage", "gate"], registry=REGISTRY)
    for key, help_text in (
        ("observed", "Latest observed figure of the gate (absent while it has no data)"),
        ("threshold", "The bound the gate's observed figure is held to"),
        ("sample", "The sample the gate's latest figure is over"),
        ("min_sample", "The sample the gate needs before it may pass"),
        ("failing", "1 when the gate's latest result is a failure, else 0"),
    )
}
CONTROLLER_ACTIVE = Gauge(
    "edgefleet_controller_active", "1 when this process's rollout controller holds the leader lock",
    registry=REGISTRY,
)
CONTROLLER_TICKS = Counter(
    "edgefleet_controller_ticks", "Controller evaluations of all running rollouts", registry=REGISTRY,
)
RETENTION_DELETED = Counter(
    "edgefleet_retention_deleted", "Rows deleted by the retention job, by table", ["table"],
    registry=REGISTRY,
)
DEVICES = Gauge("edgefleet_devices", "Enrolled devices", registry=REGISTRY)
DEVICES_ONLINE = Gauge(
    "edgefleet_devices_online", "Devices online and heard from within silence_after_s", registry=REGISTRY,
)
ROLLOUTS = Gauge("edgefleet_rollouts", "Rollouts by state", ["state"], registry=REGISTRY)
# Per device, from its DeviceClaim row (every ingester's refusals): the devices with the most.
DEVICE_REFUSED_SERIES = 1000
DEVICE_REFUSED = Gauge(
    "edgefleet_device_telemetry_refused",
    f"Telemetry messages of a device refused by the ingesters, by cause (malformed or out of bounds, "
    f"duplicate, over_budget, db_refused); the {DEVICE_REFUSED_SERIES} devices with the most",
    ["device", "cause"], registry=REGISTRY,
)

ROLLOUT_STATES = tuple(state.value for state in RolloutState)


def record_gate(gate: str, result: str) -> None:
    """Count one gate evaluation; ``result`` is e.g. pass, fail or waiting (too small a sample)."""
    GATE_EVALUATIONS.labels(gate=str(gate)[:64], result=str(result)[:32]).inc()


def record_denied(status: int, reason: str) -> None:
    HTTP_DENIED.labels(status=str(status), reason=reason).inc()


def record_ingest_lag(seconds: float) -> None:
    INGEST_LAG.observe(max(0.0, seconds))


def refresh_from_db(engine: Any, silence_after_s: float) -> None:
    """Set the gauges that come from the database (called at scrape time)."""
    from sqlalchemy import func
    from sqlmodel import Session, col, select

    from fleet.db.models import Device, Rollout

    cutoff = datetime.now(UTC) - timedelta(seconds=silence_after_s)
    with Session(engine) as session:
        DEVICES.set(session.exec(select(func.count()).select_from(Device)).one())
        online = select(func.count()).select_from(Device).where(
            col(Device.online), col(Device.last_seen) >= cutoff
        )
        DEVICES_ONLINE.set(session.exec(online).one())
        counts = dict(session.exec(select(Rollout.state, func.count()).group_by(Rollout.state)).all())
    for state in {*ROLLOUT_STATES, *counts}:
        ROLLOUTS.labels(state=state).set(counts.get(state, 0))
    with Session(engine) as session:
        active = session.exec(
            select(Rollout.id, Rollout.gate_results).where(col(Rollout.state).in_(("running", "paused")))
        ).all()
    set_gate_gauges(active)
    set_device_refused(engine)


def set_device_refused(engine: Any) -> None:
    """``edgefleet_device_telemetry_refused`` from the DeviceClaim rows with any refusal."""
    from sqlmodel import Session, col, select

    from fleet.db.models import DeviceClaim
    from fleet.ingest.claims_store import CAUSES

    c = DeviceClaim
    total = col(c.malformed) + col(c.duplicate) + col(c.over_budget) + col(c.db_refused)
    with Session(engine) as session:
        rows = session.exec(
            select(c).where(total > 0).order_by(total.desc()).limit(DEVICE_REFUSED_SERIES)
        ).all()
    DEVICE_REFUSED.clear()
    for row in rows:
        for cause in CAUSES:
            DEVICE_REFUSED.labels(device=row.device_id, cause=cause).set(getattr(row, cause))


def set_gate_gauges(rollouts: Iterable[tuple[int | None, Any]]) -> None:
    """The gauges of each gate of the given rollouts' current stage, from ``Rollout.gate_results``
    (the database, so any fleet process answers the same); ended rollouts' series go away."""
    for gauge in GATE_FIGURES.values():
        gauge.clear()
    for rollout_id, results in rollouts:
        for r in results or []:
            if not isinstance(r, dict):
                continue
            labels = {"rollout": str(rollout_id), "stage": str(r.get("stage_name", r.get("stage")))[:64],
                      "gate": str(r.get("gate"))[:64]}
            figures = {**r, "failing": 1.0 if r.get("status") == "fail" else 0.0}
            for key, gauge in GATE_FIGURES.items():
                figure = figures.get(key)
                if isinstance(figure, int | float) and not isinstance(figure, bool):
                    gauge.labels(**labels).set(figure)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class MetricsMiddleware:
    """Outermost ASGI layer: counts every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            HTTP_LATENCY.labels(method=method, route=route).observe(time.perf_counter() - start)
