"""Starting and rolling back a rollout of 10,000 devices on SQLite and PostgreSQL: membership,
previous releases, assignments, generations and desired-state notices written by set-based
statements (fleet.rollout.membership, fleet.rollout.assignments) are what the per-device
path wrote, device by device."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet_support import admin, make_bundle, upload
from litestar.testing import TestClient
from sqlalchemy import insert
from sqlmodel import Session, select

from fleet.broker.client import RecordingPublisher
from fleet.db.models import Assignment, Bundle, Device, RolloutDevice, table_of
from fleet.rollout import engine as eng
from fleet.rollout.controller import RolloutController
from shared.bundle.keyring import Keyring

N = 10_000
MODEL = "detector"


def ident(i: int) -> str:
    return f"d{i:05d}"


def test_start_and_rollback_of_ten_thousand_devices(client: TestClient[Any], keyring: Keyring,
                                                     tmp_path: Path) -> None:
    ctrl: RolloutController = client.app.state.ctx.controller
    pub = RecordingPublisher()
    ctrl.publisher = pub
    r1 = upload(client, make_bundle(tmp_path / "1", keyring, release=1).path).json()["id"]
    r2 = upload(client, make_bundle(tmp_path / "2", keyring, release=2).path).json()["id"]
    engine = client.app.state.ctx.engine
    now = datetime.now(UTC)
    with Session(engine) as s:
        s.execute(insert(table_of(Device)), [
            {"id": ident(i), "labels": {"site": "lab" if i < N else "elsewhere"},
             "credential_hash": f"{i:064x}", "enrolled_at": now, "online": True, "agent_version": "",
             "models": {}, "generation": 3}
            for i in range(N + 1)
        ])
        # even devices run r1; d00001 is already on r2 (the target)
        s.execute(insert(table_of(Assignment)), [
            {"device_id": ident(i), "model": MODEL, "bundle_id": r1, "rollout_id": None, "generation": 3,
             "updated_at": now}
            for i in range(0, N, 2)
        ] + [{"device_id": ident(1), "model": MODEL, "bundle_id": r2, "rollout_id": None, "generation": 3,
              "updated_at": now}])
        s.commit()
    body = {"name": "big", "bundle_id": r2, "selector": {"site": "lab"},
            "stages": [{"name": "canary", "percent": 10, "bake_seconds": 0},
                       {"name": "all", "percent": 100, "bake_seconds": 0}]}
    r = client.post("/api/v1/rollouts", json=body, headers=admin())
    assert r.status_code == 201, r.text
    rid = int(r.json()["id"])
    ctrl.start(rid)

    expected = eng.assign_stages(rid, eng.parse_spec(body), [(ident(i), {"site": "lab"}) for i in range(N)])
    canary = {d for d, st in expected.items() if st == 0}
    assert 0 < len(canary) < N
    with Session(engine) as s:
        members = {m.device_id: m for m in s.exec(select(RolloutDevice)
                                                   .where(RolloutDevice.rollout_id == rid))}
        assignments = {a.device_id: a for a in s.exec(select(Assignment))}
        generations = {d.id: d.generation for d in s.exec(select(Device))}
    assert {d: m.stage for d, m in members.items()} == expected  # ident(N), elsewhere, is not in it
    for d, m in members.items():
        i = int(d[1:])
        assert m.previous_bundle_id == (r1 if i % 2 == 0 else r2 if i == 1 else None), d
        assert m.status == ("assigned" if d in canary else "pending"), d
        if d in canary:
            a = assignments[d]
            assert (a.bundle_id, a.rollout_id) == (r2, rid), d
            moved = d != ident(1)  # already on the target: only the rollout's id
            assert generations[d] == (4 if moved else 3), d
            assert a.generation == generations[d], d
        else:
            assert generations[d] == 3, d
            if d in assignments:
                assert assignments[d].rollout_id is None and assignments[d].bundle_id in (r1, r2), d
    notified = {t.split("/")[-2] for t, *_ in pub.messages}
    assert notified == canary - {ident(1)}

    pub.messages.clear()
    ctrl.rollback(rid)
    with Session(engine) as s:
        members = {m.device_id: m for m in s.exec(select(RolloutDevice)
                                                   .where(RolloutDevice.rollout_id == rid))}
        assignments = {a.device_id: a for a in s.exec(select(Assignment))}
        reissued = {b.id: b.release for b in s.exec(select(Bundle))}
        after = {d.id: d.generation for d in s.exec(select(Device))}
    for d in canary:
        previous = members[d].previous_bundle_id
        if previous is None:
            assert members[d].status == "removed" and d not in assignments, d
        else:
            assert members[d].status == "rolled_back", d
            assert assignments[d].rollout_id == rid and reissued[assignments[d].bundle_id] > 2, d
        assert after[d] == generations[d] + 1, d
    assert all(members[d].status == "pending" for d in members if d not in canary)
    assert {t.split("/")[-2] for t, *_ in pub.messages} == canary
