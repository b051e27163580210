"""Health of a rollout over time: error rate and p95 latency per time bucket, per release,
of the devices in the rollout, from the raw ``HealthReport`` rows.

``bucket_series`` is pure (rows in, JSON out); ``rollout_health`` picks the rows and the
window from the database; ``RolloutHealthController`` serves it at
``GET /api/v1/rollouts/{id}/health?bucket_s=N`` (scope ``read``).

The window runs from ``LEAD_S`` before the rollout started (its creation when it never
started) to now, or, for a rollout that ended, to ``TAIL_S`` after its last update, so the
chart shows the baseline before and the recovery after. Buckets are aligned on multiples of
``bucket_s`` in UNIX time and widened so that a window never holds more than
``MAX_BUCKETS``; the answer says which ``bucket_s`` it used. Times are the fleet's receive
times (device clocks may be off), as UNIX seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.exceptions import ClientException
from litestar.params import FromPath, FromQuery
from sqlmodel import Session, col, select

from fleet.api.auth import operator_guard
from fleet.api.response_schemas import RolloutHealthChart, ok
from fleet.api.rollout_schemas import READ_RESPONSES
from fleet.api.schemas import BAD_REQUEST
from fleet.db.models import Bundle, HealthReport, Rollout, RolloutDevice, RolloutEvent, as_utc
from fleet.errors import NotFoundError

LEAD_S = 60.0
TAIL_S = 300.0
MAX_BUCKETS = 720
MIN_BUCKET_S, MAX_BUCKET_S = 1, 3600
ACTIVE_STATES = {"created", "running", "paused"}
MARKER_KINDS = {"started", "stage_started", "gate_failed", "paused", "resumed", "rolled_back", "succeeded",
                "aborted"}


@dataclass(frozen=True)
class Report:
    """One device's health window for the rollout's model, as the chart needs it."""

    t: float  # received, UNIX seconds
    device_id: str
    release: int
    inferences: int
    errors: int
    p95_ms: float | None


def effective_bucket(bucket_s: int, start: float, end: float) -> int:
    """``bucket_s``, widened so the window holds at most MAX_BUCKETS buckets."""
    span = max(end - start, 0.0)
    return max(bucket_s, math.ceil(span / MAX_BUCKETS))


def _point(t: float, group: list[Report]) -> dict[str, Any]:
    inferences = sum(r.inferences for r in group)
    errors = sum(r.errors for r in group)
    p95 = [r.p95_ms for r in group if r.p95_ms is not None]
    return {
        "t": t,
        "inferences": inferences,
        "errors": errors,
        "error_rate": errors / inferences if inferences else None,
        # the worst device of the bucket: a single slow device is what an operator must see
        "p95_ms": max(p95) if p95 else None,
        "reports": len(group),
        "devices": len({r.device_id for r in group}),
    }


def bucket_series(reports: Iterable[Report], *, start: float, end: float, bucket_s: int) -> dict[str, Any]:
    """Reports inside [start, end] summed per bucket: all releases together (``buckets``)
    and one series per release (``series``, releases ascending). Empty buckets are left out."""
    by_bucket: dict[float, list[Report]] = {}
    by_release: dict[int, dict[float, list[Report]]] = {}
    for r in reports:
        if not start <= r.t <= end:
            continue
        b = math.floor(r.t / bucket_s) * bucket_s
        by_bucket.setdefault(b, []).append(r)
        by_release.setdefault(r.release, {}).setdefault(b, []).append(r)
    return {
        "bucket_s": bucket_s,
        "from": start,
        "to": end,
        "buckets": [_point(b, g) for b, g in sorted(by_bucket.items())],
        "series": [
            {"release": release, "points": [_point(b, g) for b, g in sorted(buckets.items())]}
            for release, buckets in sorted(by_release.items())
        ],
    }


def _ts(value: Any) -> float | None:
    ts = as_utc(value)
    return ts.timestamp() if ts else None


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def rollout_health(
    session: Session, rollout_id: int, bucket_s: int, *, now: float | None = None
) -> dict[str, Any]:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist", rollout_id=rollout_id)
    now = time.time() if now is None else now
    began = _ts(rollout.started_at) or _ts(rollout.created) or now
    start = began - LEAD_S
    end = now
    if rollout.state not in ACTIVE_STATES:
        end = min(now, (_ts(rollout.updated) or now) + TAIL_S)
    bucket = effective_bucket(bucket_s, start, end)
    devices = list(
        session.exec(select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout_id)).all()
    )
    rows: list[Report] = []
    if devices:
        stmt = select(
            HealthReport.received_at, HealthReport.device_id, HealthReport.release, HealthReport.inferences,
            HealthReport.errors, HealthReport.p95_ms,
        ).where(
            HealthReport.model == rollout.model,
            col(HealthReport.device_id).in_(devices),
            col(HealthReport.received_at) >= _dt(start),
            col(HealthReport.received_at) <= _dt(end),
        )
        rows = [Report(_ts(t) or 0.0, d, rel, n, e, p) for t, d, rel, n, e, p in session.exec(stmt)]
    bundle = session.get(Bundle, rollout.bundle_id)
    events = session.exec(
        select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id).order_by(col(RolloutEvent.id))
    ).all()
    out = bucket_series(rows, start=start, end=end, bucket_s=bucket)
    out.update(
        rollout_id=rollout_id,
        model=rollout.model,
        release=bundle.release if bundle else None,
        state=rollout.state,
        devices=len(devices),
        markers=[
            {"t": _ts(e.ts), "kind": e.kind, "message": e.message} for e in events if e.kind in MARKER_KINDS
        ],
    )
    return out


class RolloutHealthController(Controller):
    path = "/api/v1/rollouts"
    tags = ["rollouts"]
    guards = [operator_guard]

    @get(
        "/{rollout_id:int}/health",
        sync_to_thread=True,
        summary="Error rate and p95 latency per time bucket of the rollout's devices",
        description="From the raw health reports of the devices in the rollout, for its model: "
        "per bucket of bucket_s seconds (1-3600, default 10, widened to at most 720 buckets) the "
        "inferences, errors, error rate and the worst device's p95, for all releases together "
        "('buckets') and per release ('series'); 'markers' are the rollout's stage and gate events. "
        "Times are UNIX seconds.",
        responses={**ok(RolloutHealthChart, "The chart's buckets, series per release and markers"),
                   **BAD_REQUEST, **READ_RESPONSES},
    )
    def health(
        self, rollout_id: FromPath[int], state: State, bucket_s: FromQuery[int] = 10
    ) -> dict[str, Any]:
        if not MIN_BUCKET_S <= bucket_s <= MAX_BUCKET_S:
            raise ClientException(
                detail=f"bucket_s={bucket_s}: give a bucket of {MIN_BUCKET_S} to {MAX_BUCKET_S} seconds"
            )
        with Session(state.ctx.engine) as session:
            return rollout_health(session, rollout_id, bucket_s)
