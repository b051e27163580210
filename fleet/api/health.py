"""Liveness, Prometheus metrics, the fleet's own counters and the health rollups."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.params import FromQuery
from sqlmodel import Session

from fleet import metrics
from fleet.api.auth import operator_guard
from fleet.api.context import AppContext
from fleet.api.response_schemas import READ, IngestStats, Liveness, ReleaseHealth, ok
from fleet.api.schemas import TOO_MANY
from fleet.ingest import rollup


class OpsController(Controller):
    """Served by every fleet process, whatever its role."""

    tags = ["operations"]

    @get("/healthz", summary="Liveness", responses={**ok(Liveness, "The process runs"), **TOO_MANY},
         security=[{}])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        media_type="text/plain; version=0.0.4; charset=utf-8",
        responses=TOO_MANY,
        security=[{}],
    )
    async def metrics(self, state: State) -> Response[bytes]:
        ctx: AppContext = state.ctx
        await anyio.to_thread.run_sync(metrics.refresh_from_db, ctx.engine, ctx.settings.silence_after_s)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


class HealthController(Controller):
    path = "/api/v1"
    tags = ["health"]
    guards = [operator_guard]

    @get("/stats", summary="Ingestion counters of this process",
         responses={**ok(IngestStats, "This process's ingester counters"), **READ})
    async def stats(self, state: State) -> dict[str, Any]:
        ingester = state.ctx.ingester
        return {"ingest": ingester.stats.snapshot() if ingester else None}

    @get(
        "/health/releases",
        sync_to_thread=True,
        responses={**ok(list[ReleaseHealth], "Per model and release, its totals"), **READ},
        summary="Health per model and release, from the hourly rollups",
        description="Reports, inferences, errors, error rate, worst p95 latency and the number of "
        "devices, summed over every device that reported the release (kept for "
        "rollup_retention_days, after raw reports are trimmed).",
    )
    def releases(self, state: State, model: FromQuery[str | None] = None) -> list[dict[str, Any]]:
        with Session(state.ctx.engine) as session:
            return rollup.per_release(session, model)
