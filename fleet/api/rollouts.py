"""Rollouts: create from a spec, operate (start/pause/resume/approve/abort/rollback), status."""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlmodel import Session, col, select

from fleet.api.auth import operator_guard
from fleet.api.context import AppContext
from fleet.db.models import Rollout
from fleet.errors import NotFoundError
from fleet.rollout.status import rollout_status


def _status(ctx: AppContext, rollout_id: int) -> dict[str, Any]:
    with Session(ctx.engine) as session:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            raise NotFoundError(f"rollout {rollout_id} does not exist", rollout_id=rollout_id)
        return rollout_status(session, rollout)


class RolloutsController(Controller):
    path = "/api/v1/rollouts"
    tags = ["rollouts"]
    guards = [operator_guard]

    @post("/", sync_to_thread=True, status_code=201, summary="Create a rollout from a spec")
    def create(self, data: JSONBody[dict[str, Any]], state: State) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        rollout_id = ctx.controller.create(data)
        return _status(ctx, rollout_id)

    @get("/", sync_to_thread=True, summary="All rollouts, newest first")
    def list_rollouts(self, state: State) -> list[dict[str, Any]]:
        with Session(state.ctx.engine) as session:
            rows = session.exec(select(Rollout).order_by(col(Rollout.id).desc())).all()
            return [rollout_status(session, r, events=False) for r in rows]

    @get("/{rollout_id:int}", sync_to_thread=True, summary="Status and history of a rollout")
    def get_rollout(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return _status(state.ctx, rollout_id)

    async def _op(self, state: State, rollout_id: int, op: str) -> dict[str, Any]:
        ctx: AppContext = state.ctx
        await anyio.to_thread.run_sync(getattr(ctx.controller, op), rollout_id)
        return await anyio.to_thread.run_sync(_status, ctx, rollout_id)

    @post("/{rollout_id:int}/start", status_code=200, summary="Start: assign the first stage")
    async def start(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "start")

    @post("/{rollout_id:int}/pause", status_code=200, summary="Pause where it is")
    async def pause(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "pause")

    @post("/{rollout_id:int}/resume", status_code=200, summary="Resume; the stage's bake time restarts")
    async def resume(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "resume")

    @post(
        "/{rollout_id:int}/approve",
        status_code=200,
        summary="Approve the stage that passed and waits for approval; it goes on to the next stage",
    )
    async def approve(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "approve")

    @post("/{rollout_id:int}/abort", status_code=200, summary="Stop; devices keep their assignment")
    async def abort(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "abort")

    @post(
        "/{rollout_id:int}/rollback",
        status_code=200,
        summary="Roll back: re-issue each device's previous release as a new release",
    )
    async def rollback(self, rollout_id: FromPath[int], state: State) -> dict[str, Any]:
        return await self._op(state, rollout_id, "rollback")
