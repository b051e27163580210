"""The declared type of ``Device.models``: each model on a device as the fleet last heard it.

The ingester writes it from health messages and events (fleet.ingest.ingester); the rollout
inputs, rollout status, release numbers and the device API read it. The column stays JSON
(no migration: the stored shape is the one these types encode, with unset fields left out),
and rows written before a field existed read with its default. A row that does not match the
type (hand-edited, or from a fleet that predates it) reads as an empty entry, logged once
per read, rather than failing the reader.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from shared.telemetry.messages import ShadowHealth

log = logging.getLogger(__name__)


class ReportedShadow(ShadowHealth, kw_only=True):
    """A shadow evaluation's latest (cumulative) figures, as the device reported them."""

    received_at: float = 0.0  # when the fleet received them (UNIX seconds)


class ReportedModel(msgspec.Struct, omit_defaults=True):
    """One model on one device: what it serves and the latest update event applied."""

    release: int | None = None
    version: str | None = None
    state: str | None = None  # its update lifecycle state (docs/agent-lifecycle.md)
    waiting: str | None = None  # what a staged release waits for before activation
    held: list[int] | None = None  # releases whose files the device keeps
    shadow: ReportedShadow | None = None  # a candidate evaluated beside it
    # the seq and ts of the latest event applied (an Event, or a health's last_event): older
    # or repeated events never move the serving state back
    event_seq: int | None = None
    event_ts: float | None = None



def read_models(raw: Any) -> dict[str, ReportedModel]:
    """``Device.models`` as read from the database (a dict of JSON objects)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, ReportedModel] = {}
    for name, entry in raw.items():
        try:
            out[name] = msgspec.convert(entry, ReportedModel)
        except msgspec.ValidationError as exc:
            log.warning("stored state of model %r does not match its type (%s); read as empty", name, exc)
            out[name] = ReportedModel()
    return out


def read_model(raw: Any, name: str) -> ReportedModel:
    """One model's entry (empty when the device has not reported it)."""
    entry = raw.get(name) if isinstance(raw, dict) else None
    if entry is None:
        return ReportedModel()
    return read_models({name: entry})[name]


def stored_models(models: dict[str, ReportedModel]) -> dict[str, Any]:
    """The JSON the column stores."""
    return {name: msgspec.to_builtins(entry) for name, entry in models.items()}
