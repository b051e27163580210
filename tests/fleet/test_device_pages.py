"""GET /api/v1/devices in pages: order, the next link, bounds, and the CLI client walking them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fleet_support import admin, enroll, make_bundle, upload
from litestar.testing import TestClient

from fleet.cli.client import FleetClient
from fleet.db.engine import session_scope
from fleet.rollout.assignments import set_assignment
from shared.bundle.keyring import Keyring


def test_pages_walk_every_device_once_in_id_order(client: TestClient[Any]) -> None:
    ids = [f"edge-{i:02d}" for i in (5, 1, 4, 2, 3)]
    for device_id in ids:
        enroll(client, device_id)
    seen: list[str] = []
    url: str | None = "/api/v1/devices?limit=2"
    pages = 0
    while url:
        r = client.get(url, headers=admin())
        assert r.status_code == 200, r.text
        seen += [d["device_id"] for d in r.json()]
        pages += 1
        link = r.headers.get("link")
        url = link[1:link.index(">")] if link else None
    assert seen == sorted(ids)
    assert pages == 3  # 2 + 2 + 1: the short last page has no next link
    everything = client.get("/api/v1/devices", headers=admin()).json()
    assert [d["device_id"] for d in everything] == sorted(ids)  # no limit: all of them, as before


def test_each_device_on_a_page_carries_its_own_assignments(
    client: TestClient[Any], keyring: Keyring, tmp_path: Path
) -> None:
    # a page reads its assignments by the range of its ids: none from the neighbours' pages
    bundle_id = upload(client, make_bundle(tmp_path, keyring, name="detector", release=1).path).json()["id"]
    ids = [f"edge-{i}" for i in range(6)]
    for device_id in ids:
        enroll(client, device_id)
    with session_scope(client.app.state.ctx.engine) as session:
        for device_id in ids[::2]:  # edge-0, edge-2, edge-4
            set_assignment(session, device_id, "detector", bundle_id, None)
    page = client.get("/api/v1/devices?after=edge-0&limit=3", headers=admin()).json()
    assert [d["device_id"] for d in page] == ["edge-1", "edge-2", "edge-3"]
    assert [sorted(d["assigned"]) for d in page] == [[], ["detector"], []]
    assert page[1]["assigned"]["detector"]["release"] == 1


def test_limit_out_of_bounds_is_a_clear_400(client: TestClient[Any]) -> None:
    for bad in ("0", "1001", "-3"):
        r = client.get(f"/api/v1/devices?limit={bad}", headers=admin())
        assert r.status_code == 400 and "limit" in r.text, r.text


def test_cli_client_follows_pages(client: TestClient[Any]) -> None:
    for i in range(7):
        enroll(client, f"dev-{i}")

    def handler(request: httpx.Request) -> httpx.Response:
        r = client.get(str(request.url.raw_path, "ascii"), headers=dict(request.headers))
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})

    fc = FleetClient("http://fleet.test", token=admin()["Authorization"].split()[1],
                     transport=httpx.MockTransport(handler))
    try:
        assert [d["device_id"] for d in fc.list_devices(page_size=3)] == [f"dev-{i}" for i in range(7)]
    finally:
        fc.close()
