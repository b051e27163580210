"""Rollouts: create from a spec, operate (start/pause/resume/approve/abort/rollback), status.

Bodies are typed (fleet.api.rollout_schemas), so the OpenAPI document shows the spec and the
status document, and each route documents its 400/401/403/404/409 answers with examples."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlmodel import Session, col, select

from fleet.api.auth import operator_guard
from fleet.api.context import AppContext
from fleet.api.rollout_schemas import (
    CREATE_RESPONSES,
    LIST_RESPONSES,
    OPERATION_RESPONSES,
    READ_RESPONSES,
    RolloutCreate,
    RolloutStatus,
    as_status,
)
from fleet.db.models import HealthRollup, Rollout, RolloutDevice
from fleet.errors import NotFoundError
from fleet.rollout.capacity import capacity_warnings
from fleet.rollout.engine import parse_spec
from fleet.rollout.status import rollout_status

TRAFFIC_HOURS = 24  # the devices' traffic of the model is read from this many hours of rollups


def _status(ctx: AppContext, rollout_id: int) -> RolloutStatus:
    with Session(ctx.engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist", rollout_id=rollout_id)
        return as_status(rollout_status(session, rollout))


def _create(ctx: AppContext, spec: Any) -> RolloutStatus:
    rollout_id = ctx.controller.create(spec)
    status = _status(ctx, rollout_id)
    status.warnings = _capacity_warnings(ctx, rollout_id)
    return status


def _capacity_warnings(ctx: AppContext, rollout_id: int) -> list[str]:
    """What the shadow stages cannot catch at their devices' recent traffic of the model
    (fleet.rollout.capacity); a stage whose devices reported no traffic is not judged."""
    since = datetime.now(UTC) - timedelta(hours=TRAFFIC_HOURS)
    with Session(ctx.engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return []
        spec = parse_spec(rollout.spec)
        if not any(st.mode == "shadow" for st in spec.stages):
            return []
        stage_of = {m.device_id: m.stage for m in session.exec(
            select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id))}
        per_device: dict[str, list[int]] = {}
        for row in session.exec(select(HealthRollup).where(
                HealthRollup.model == rollout.model, col(HealthRollup.hour) >= since,
                col(HealthRollup.device_id).in_(
                    select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout_id)))):
            per_device.setdefault(row.device_id, []).append(row.inferences)
    rates = {d: sum(v) / (len(v) * 3600.0) for d, v in per_device.items()}
    devices: list[int] = []
    traffic: dict[int, float] = {}
    stages: list[tuple[str, str, float, float, dict[str, float | int | None]]] = []
    for i, st in enumerate(spec.stages):
        members = [d for d, k in stage_of.items() if k <= i]
        devices.append(len(members))
        known = sorted(rates[d] for d in members if d in rates)
        if known:
            traffic[i] = statistics.median(known)
        g = st.gates or spec.gates
        stages.append((st.name, st.mode, st.shadow_sample_rate, st.bake_seconds,
                       {"min_agreement": g.min_agreement, "trim_devices": g.trim_devices}))
    return capacity_warnings(stages, devices, traffic)


class RolloutsController(Controller):
    path = "/api/v1/rollouts"
    tags = ["rollouts"]
    guards = [operator_guard]

    @post("/", status_code=201, summary="Create a rollout from a spec", responses=CREATE_RESPONSES)
    async def create(
        self, data: JSONBody[RolloutCreate], request: Request[Any, Any, Any], state: State
    ) -> RolloutStatus:
        # ``data`` is the typed view (and the document's schema); the spec itself is the JSON
        # as sent, decoded strictly by engine.parse_spec, which names the field it refuses.
        spec = msgspec.json.decode(await request.body())
        return await anyio.to_thread.run_sync(_create, state.ctx, spec)

    @get("/", sync_to_thread=True, summary="All rollouts, newest first (without events)",
         responses=LIST_RESPONSES)
    def list_rollouts(self, state: State) -> list[RolloutStatus]:
        with Session(state.ctx.engine) as session:
            rows = session.exec(select(Rollout).order_by(col(Rollout.id).desc())).all()
            return [as_status(rollout_status(session, r, events=False)) for r in rows]

    @get("/{rollout_id:int}", sync_to_thread=True, summary="Status and history of a rollout",
         responses=READ_RESPONSES)
    def get_rollout(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return _status(state.ctx, rollout_id)

    async def _op(self, state: State, rollout_id: int, op: str) -> RolloutStatus:
        ctx: AppContext = state.ctx
        await anyio.to_thread.run_sync(getattr(ctx.controller, op), rollout_id)
        return await anyio.to_thread.run_sync(_status, ctx, rollout_id)

    @post("/{rollout_id:int}/start", status_code=200, summary="Start: assign the first stage",
          responses=OPERATION_RESPONSES)
    async def start(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "start")

    @post("/{rollout_id:int}/pause", status_code=200, summary="Pause where it is",
          responses=OPERATION_RESPONSES)
    async def pause(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "pause")

    @post("/{rollout_id:int}/resume", status_code=200, summary="Resume; the stage's bake time restarts",
          responses=OPERATION_RESPONSES)
    async def resume(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "resume")

    @post(
        "/{rollout_id:int}/approve",
        status_code=200,
        summary="Approve the stage that passed and waits for approval; it goes on to the next stage",
        responses=OPERATION_RESPONSES,
    )
    async def approve(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "approve")

    @post("/{rollout_id:int}/abort", status_code=200, summary="Stop; devices keep their assignment",
          responses=OPERATION_RESPONSES)
    async def abort(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "abort")

    @post(
        "/{rollout_id:int}/rollback",
        status_code=200,
        summary="Roll back: re-issue each device's previous release as a new release",
        responses=OPERATION_RESPONSES,
    )
    async def rollback(self, rollout_id: FromPath[int], state: State) -> RolloutStatus:
        return await self._op(state, rollout_id, "rollback")
