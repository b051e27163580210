"""The dashboard's routes and the rollout health series: the pure bucketing, and the endpoint
over HTTP on a database seeded with a rollout, its devices and their health reports."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlmodel import Session

from fleet.app import create_app
from fleet.dashboard.health import LEAD_S, MAX_BUCKETS, Report, bucket_series, effective_bucket
from fleet.db.models import Bundle, Device, HealthReport, Rollout, RolloutDevice, RolloutEvent
from fleet.settings import Settings

ADMIN = "dashboard-test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_buckets_sum_per_bucket_and_release() -> None:
    reports = [
        Report(100.0, "a", 1, 100, 0, 4.0),
        Report(104.0, "b", 1, 50, 5, 9.0),
        Report(103.0, "a", 2, 10, 5, 20.0),
        Report(111.0, "a", 2, 10, 0, None),
        Report(500.0, "a", 2, 10, 0, 1.0),  # outside the window
    ]
    out = bucket_series(reports, start=95.0, end=120.0, bucket_s=10)
    assert [b["t"] for b in out["buckets"]] == [100, 110]
    first = out["buckets"][0]
    assert (first["inferences"], first["errors"], first["reports"], first["devices"]) == (160, 10, 3, 2)
    assert first["error_rate"] == pytest.approx(10 / 160) and first["p95_ms"] == 20.0
    assert out["buckets"][1]["p95_ms"] is None
    series = {s["release"]: s["points"] for s in out["series"]}
    assert sorted(series) == [1, 2]
    assert series[1][0]["error_rate"] == pytest.approx(5 / 150) and series[1][0]["p95_ms"] == 9.0
    assert [p["t"] for p in series[2]] == [100, 110]


def test_no_inferences_has_no_error_rate_and_buckets_widen() -> None:
    out = bucket_series([Report(10.0, "a", 1, 0, 0, None)], start=0.0, end=20.0, bucket_s=5)
    assert out["buckets"][0]["error_rate"] is None
    assert effective_bucket(10, 0.0, 100.0) == 10
    assert effective_bucket(1, 0.0, 86_400.0) == 86_400 // MAX_BUCKETS


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'fleet.db'}", admin_token=ADMIN,
        run_ingester=False, run_controller=False,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _seed(client: TestClient[Any]) -> tuple[int, datetime]:
    """A rolled-back rollout of m r2 on devices a and b (and c outside it), with reports."""
    started = datetime.now(UTC) - timedelta(minutes=2)
    with Session(client.app.state.ctx.engine) as session:
        for d in ("a", "b", "c"):
            session.add(Device(id=d, credential_hash=d * 64))
        bundle = Bundle(
            name="m", release=2, version="2", digest="d" * 64, envelope=b"{}", created="", expires=""
        )
        session.add(bundle)
        session.flush()
        rollout = Rollout(name="m r2", model="m", bundle_id=bundle.id, spec={"stages": [{"name": "all"}]},
                          state="rolled_back", started_at=started, created=started, updated=started)
        session.add(rollout)
        session.flush()
        assert rollout.id is not None
        session.add_all([RolloutDevice(rollout_id=rollout.id, device_id=d, stage=0) for d in ("a", "b")])
        session.add(RolloutEvent(rollout_id=rollout.id, kind="rolled_back", message="rolled back: bad",
                                 ts=started + timedelta(seconds=30)))
        for i, (device, release, errors) in enumerate(
            [("a", 1, 0), ("a", 2, 8), ("b", 2, 2), ("c", 2, 50), ("a", 1, 0)]
        ):
            at = started + timedelta(seconds=5 + 10 * i)
            session.add(HealthReport(device_id=device, ts=0.0, received_at=at, seq=i, model="m",
                                     release=release, inferences=20, errors=errors, p95_ms=3.0))
        session.add(HealthReport(device_id="a", ts=0.0, received_at=started - timedelta(seconds=LEAD_S + 60),
                                 seq=99, model="m", release=1, inferences=20, errors=20))
        session.commit()
        return rollout.id, started


def test_health_endpoint_counts_the_rollouts_devices_in_its_window(client: TestClient[Any]) -> None:
    rid, started = _seed(client)
    out = client.get(f"/api/v1/rollouts/{rid}/health?bucket_s=5", headers=AUTH).json()
    assert out["rollout_id"] == rid and out["model"] == "m" and out["release"] == 2
    assert out["devices"] == 2 and out["bucket_s"] == 5
    assert out["from"] == pytest.approx(started.timestamp() - LEAD_S)
    # c is not in the rollout; the report before the lead is outside the window
    assert sum(b["inferences"] for b in out["buckets"]) == 80
    assert sum(b["errors"] for b in out["buckets"]) == 10
    assert [s["release"] for s in out["series"]] == [1, 2]
    assert [m["kind"] for m in out["markers"]] == ["rolled_back"]
    assert client.get(f"/api/v1/rollouts/{rid}/health", headers=AUTH).json()["bucket_s"] == 10


def test_health_endpoint_refusals(client: TestClient[Any]) -> None:
    rid, _ = _seed(client)
    assert client.get(f"/api/v1/rollouts/{rid}/health").status_code == 401
    assert client.get("/api/v1/rollouts/999/health", headers=AUTH).status_code == 404
    bad = client.get(f"/api/v1/rollouts/{rid}/health?bucket_s=0", headers=AUTH)
    assert bad.status_code == 400 and "1 to 3600 seconds" in bad.json()["detail"]
    assert client.get(f"/api/v1/rollouts/{rid}/health?bucket_s=x", headers=AUTH).status_code == 400


def test_page_redirect_and_static_files(client: TestClient[Any]) -> None:
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (301, 302, 307, 308) and root.headers["location"] == "/dashboard"
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "/dashboard/static/dashboard.js" in page.text
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css"), ("favicon.svg", "svg")):
        response = client.get(f"/dashboard/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert client.get("/dashboard/static/missing.js").status_code == 404
