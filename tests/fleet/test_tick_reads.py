"""The controller tick's reads at scale (issue 19): the window's sums get the work_mem they need
on PostgreSQL for their statement only (harmless on SQLite), a device's entry for the rollout's
model reads as ``read_model`` does, and the cyclic collector pauses only while a tick runs."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest
from sqlalchemy import func, literal, select, text
from sqlmodel import Session

from fleet.db.device_models import ReportedModel, read_model
from fleet.db.engine import make_engine
from fleet.rollout.health_reads import WORK_MEM_CEILING, WORK_MEM_FLOOR, read_all, work_mem_for
from fleet.rollout.inputs import collector_paused, model_entry


def _work_mem(session: Session) -> str:
    return str(session.execute(text("SELECT current_setting('work_mem')")).scalar_one())


def test_work_mem_is_raised_for_the_statement_only(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            if engine.dialect.name != "postgresql":
                # SQLite: no setting, the rows as they are
                assert list(read_all(session, select(literal(1)), devices=100_000)) == [(1,)]
                return
            before = _work_mem(session)
            during = read_all(session, select(func.current_setting("work_mem")), devices=200_000)
            assert during[0][0] == "200000kB"  # 1 KiB per device
            assert _work_mem(session) == before  # set back after the statement
            small = read_all(session, select(func.current_setting("work_mem")), devices=10)
            assert small[0][0] == f"{WORK_MEM_FLOOR // (1024 * 1024)}MB"
            # an operator's larger setting is kept
            session.execute(text("SET LOCAL work_mem = '2GB'"))
            kept = read_all(session, select(func.current_setting("work_mem")), devices=200_000)
            assert kept[0][0] == "2GB"
            assert _work_mem(session) == "2GB"
            session.rollback()
            assert _work_mem(session) == before  # nothing outlives the transaction
    finally:
        engine.dispose()


def test_work_mem_for_grows_with_the_stage() -> None:
    assert work_mem_for(0) == WORK_MEM_FLOOR
    assert work_mem_for(200_000) == 200_000 * 1024
    # bounded: PostgreSQL multiplies it per node, hash_mem_multiplier and parallel worker
    assert work_mem_for(1_000_000) == WORK_MEM_CEILING == 256 * 1024 * 1024


@pytest.mark.parametrize("stored", [
    {"m": {"release": 3, "version": "3", "state": "committed", "event_seq": 4, "event_ts": 1.5}},
    {"m": {"release": 2, "held": [1, 2], "shadow": {"release": 3, "samples": 10, "agreed": 9,
                                                   "received_at": 7.0}},
     "other": {"release": 1}},
    {"other": {"release": 1}},
    {},
    {"m": {"release": "three"}},  # not of the type: empty
    {"m": {"unknown_field": 1, "release": 5}},
    {"m": None},
    {"m": 5},
    [],
    "text",
    None,
])
def test_model_entry_reads_as_read_model(stored: Any) -> None:
    as_text = json.dumps(stored) if stored is not None else None
    assert model_entry(as_text, "m") == read_model(stored, "m")


def test_model_entry_of_unreadable_text_is_empty() -> None:
    assert model_entry("{not json", "m") == ReportedModel()


def test_collector_paused_only_during_the_block_and_nests() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failed tick")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as found
    finally:
        gc.enable()
